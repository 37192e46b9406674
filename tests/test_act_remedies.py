"""The activation remedies: the per-site report finds outlier channels (and that they repeat across sites), and a
16-bit activation rule keeps an outlier site's resolution; 16 bits are for activations only."""
import math

import pytest
import torch
from torch import nn

from fairseq_quant.quant import QuantSpec, Strategy, StrategyError, calibrate, quantize_model
from fairseq_quant.quant.act_report import collect_site_stats, format_site_table, repeated_outliers
from fairseq_quant.quant.quantizers import ActivationQuantizer, check_bits


class Residual(nn.Module):
    """Two linear layers reading a 16-wide stream whose channel 5 is 100x larger than the rest (a residual outlier
    dimension), then a projection reading the same stream."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = x.clone()
        x[..., 5] = x[..., 5] * 100.0
        return self.out(x + self.a(x) * 0.0) + self.b(x).sum() * 0.0


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 10, 16, generator=g) for _ in range(3)]


def test_report_names_the_outlier_channel_and_its_repetition():
    model = Residual()
    quantize_model(model, Strategy.uniform("fp32", 8))
    stats = {s.name: s for s in collect_site_stats(model, batches(), bits=8)}
    assert list(stats) == ["a.input_quantizer", "b.input_quantizer", "out.input_quantizer"]
    for s in stats.values():
        assert s.channels == 16 and s.outlier_channels == [5]
        assert s.peak_ratio == pytest.approx(max(abs(s.lo), abs(s.hi)) / s.p9999)
        # a per-tensor 8-bit grid over the outlier's range leaves the other 15 channels about 3 levels
        assert s.sqnr_db < 40
    assert repeated_outliers(list(stats.values())) == {16: {5: list(stats)}}
    table = format_site_table(list(stats.values()))
    assert table.splitlines()[0].endswith("| SQNR dB at 8 bits |") and "| a.input_quantizer | 16 |" in table
    assert all(not q.observing for q in model.modules() if isinstance(q, ActivationQuantizer))  # restored


def test_sixteen_bit_rule_keeps_the_outlier_site_resolution():
    torch.manual_seed(0)
    eight, sixteen = Residual(), Residual()
    sixteen.load_state_dict(eight.state_dict())
    quantize_model(eight, Strategy.uniform(8, 8))
    quantize_model(sixteen, Strategy.from_dict({"default": {"weight_bits": 8, "act_bits": 8},
                                                "rules": [{"match": "out", "act_bits": 16}]}))
    assert sixteen.out.input_quantizer.bits == 16 and sixteen.a.input_quantizer.bits == 8
    for m in (eight, sixteen):
        m.eval()
        calibrate(m, batches())
    x = batches()[0].clone()
    x[..., 5] *= 100.0
    exact = x[..., [i for i in range(16) if i != 5]]

    def error(m):  # the non-outlier channels of the out projection's quantized input
        q = m.out.input_quantizer(x)[..., [i for i in range(16) if i != 5]]
        return float((q - exact).pow(2).mean() / exact.pow(2).mean())

    # relative noise = step^2 / 12 over the unit-variance channels: about 0.4 at 8 bits (a step of about 3 over the
    # outlier's +-400), (255 / 65535)^2 = 1/66,000 of that at 16 bits
    assert 0.3 < error(eight) < 0.5 and error(sixteen) < 2e-5 and error(eight) / error(sixteen) > 3e4
    # the 16-bit grid: 65,536 levels over the calibrated range
    grid = sixteen.out.input_quantizer.last_grid
    assert grid.bits == 16 and grid.qmax - grid.qmin == 65535
    assert math.isclose(float(grid.scale), (float(sixteen.out.input_quantizer.hi)
                                            - float(sixteen.out.input_quantizer.lo)) / 65535, rel_tol=1e-6)


def test_sixteen_bits_are_for_activations_only():
    assert check_bits(16, "x", activation=True) == 16
    assert QuantSpec(weight_bits=8, act_bits=16).label() == "w8a16"
    with pytest.raises(ValueError, match=r"weight_bits must be an integer in 1..8 or fp32, got 16"):
        QuantSpec(weight_bits=16)
    with pytest.raises(ValueError, match=r"act_bits must be an integer in 1..8, 16 or fp32, got 12"):
        QuantSpec(act_bits=12)
    with pytest.raises(StrategyError, match=r"rule 1 \('out'\): act_bits must be an integer in 1..8, 16 or fp32"):
        Strategy.from_dict({"default": {"weight_bits": 8}, "rules": [{"match": "out", "act_bits": 32.5}]})


def test_report_refuses_a_model_without_estimated_sites():
    model = Residual()
    quantize_model(model, Strategy.uniform(8, "fp32"))
    with pytest.raises(ValueError, match="no activation quantizer with an estimated range"):
        collect_site_stats(model, batches())
