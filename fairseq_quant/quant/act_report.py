"""Per-site activation statistics: where per-tensor activation quantization loses, and why.

For every enabled activation quantizer (a *site*: the input of one linear, convolution or attention operand)
``collect_site_stats`` records, over calibration batches with the model in fp32: the range, the peak-to-percentile
ratio ``max|x| / p99.99|x|`` (how far a few values stretch a min-max range), the channels whose peak exceeds
``outlier_factor`` times the median channel peak (Bondarenko et al. 2021 find W8A8 losses in a few such residual
dimensions), and the signal-to-quantization-noise ratio (SQNR, dB) of the site's values on the grid its range gives
at ``bits``. ``repeated_outliers`` then says which outlier channels recur across sites of the same width (the
residual stream carries them from layer to layer). Pure PyTorch: the quantizers' names are the site names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .quantizers import ActivationQuantizer, RangeObserver, fake_quant_zero_point

PERCENTILE = 99.99


@dataclass
class SiteStats:
    """Statistics of one activation site (values observed in fp32)."""

    name: str
    channels: int
    lo: float
    hi: float
    p9999: float  # 99.99th percentile of |x|
    sqnr_db: float  # of the site's values quantized per tensor (min-max range) at ``bits``
    bits: int
    outlier_channels: list[int] = field(default_factory=list)

    @property
    def peak_ratio(self) -> float:
        """max|x| over the 99.99th percentile of |x|: above a few, a min-max range wastes most of its levels."""
        return max(abs(self.lo), abs(self.hi)) / max(self.p9999, 1e-12)


class _SiteObserver:
    def __init__(self, name: str):
        self.name = name
        self.range = RangeObserver(max_samples=1 << 18, per_batch=1 << 14)
        self.channel_peak: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().float()
        self.range.collect(x)
        dim = 1 if x.dim() == 4 else x.dim() - 1  # NCHW convolution inputs: channels second; else last
        peak = x.abs().transpose(0, dim).reshape(x.shape[dim], -1).amax(dim=1)
        self.channel_peak = peak if self.channel_peak is None else torch.maximum(self.channel_peak, peak)


def collect_site_stats(model: nn.Module, batches, forward=None, bits: int = 8,
                       outlier_factor: float = 6.0) -> list[SiteStats]:
    """Run ``forward(model, batch)`` (default ``model(batch)``) over ``batches`` without gradients, the quantizers
    passing values through (fp32), and return every enabled, range-estimated site's statistics in module order."""
    forward = forward or (lambda m, b: m(b))
    sites = [(n, m) for n, m in model.named_modules()
             if isinstance(m, ActivationQuantizer) and m.enabled and m.method != "fixed"]
    if not sites:
        raise ValueError("the model has no activation quantizer with an estimated range (all fp32 or fixed)")
    observers = [_SiteObserver(n) for n, _ in sites]
    hooks = [m.register_forward_hook(o) for (_, m), o in zip(sites, observers)]
    bits_of = {n: m.bits for n, m in sites}
    passthrough = []
    for _, m in sites:
        passthrough.append(m.observing)
        m.observing, m.observer = True, RangeObserver(max_samples=1, per_batch=1)  # fp32 outputs while observed
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        for (_, m), was in zip(sites, passthrough):
            m.observing, m.observer = was, None
    out = []
    for o in observers:
        if o.channel_peak is None:
            continue  # a site the batches never reached (e.g. incremental-decoding only)
        values = torch.cat(o.range.samples)
        p9999 = float(torch.quantile(values.abs(), PERCENTILE / 100))
        lo, hi = min(o.range.lo, 0.0), max(o.range.hi, 0.0)
        b = bits if bits is not None else bits_of[o.name]
        err = fake_quant_zero_point(values, torch.tensor(lo), torch.tensor(hi), b) - values
        noise, signal = float(err.pow(2).mean()), float(values.pow(2).mean())
        sqnr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
        peaks = o.channel_peak
        median = float(peaks.median())
        outliers = [int(i) for i in torch.nonzero(peaks > outlier_factor * max(median, 1e-12)).flatten()]
        out.append(SiteStats(o.name, peaks.numel(), o.range.lo, o.range.hi, p9999, sqnr, b, outliers))
    return out


def repeated_outliers(stats: list[SiteStats], min_sites: int = 2) -> dict[int, dict[int, list[str]]]:
    """{width: {channel: [sites]}} for outlier channels that occur in at least ``min_sites`` sites of one width."""
    by_width: dict[int, dict[int, list[str]]] = {}
    for s in stats:
        for c in s.outlier_channels:
            by_width.setdefault(s.channels, {}).setdefault(c, []).append(s.name)
    return {w: {c: names for c, names in sorted(chs.items()) if len(names) >= min_sites}
            for w, chs in sorted(by_width.items()) if any(len(n) >= min_sites for n in chs.values())}


def format_site_table(stats: list[SiteStats]) -> str:
    """Markdown: one row per site, worst SQNR first."""
    lines = [f"| site | channels | range | p99.99 abs | max / p99.99 | outlier channels | SQNR dB at "
             f"{stats[0].bits if stats else 8} bits |", "|---|---:|---|---:|---:|---|---:|"]
    for s in sorted(stats, key=lambda s: s.sqnr_db):
        outl = ", ".join(map(str, s.outlier_channels[:6])) + (" ..." if len(s.outlier_channels) > 6 else "")
        lines.append(f"| {s.name} | {s.channels} | [{s.lo:.2f}, {s.hi:.2f}] | {s.p9999:.2f} | {s.peak_ratio:.1f} | "
                     f"{outl or '-'} | {s.sqnr_db:.1f} |")
    return "\n".join(lines) + "\n"
