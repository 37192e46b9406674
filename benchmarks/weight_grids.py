#!/usr/bin/env python
"""Post-training error of the signed and the balanced 2-bit weight grids on a checkpoint's weights, side by side:
per quantized weight and overall, the relative squared error ``||Q(W) - W||^2 / ||W||^2`` with each grid's
MSE-optimal step per output channel (how LSQ initialises; ``lsq`` against ``balanced``).

    python benchmarks/weight_grids.py --checkpoint recipes/librispeech/reference/model.pt --bits 2
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_quant.quant.granularity import PerChannel  # noqa: E402
from fairseq_quant.quant.quantizers import WeightQuantizer  # noqa: E402

METHODS = ("lsq", "balanced")


def relative_errors(weight: torch.Tensor, bits: int) -> dict[str, float]:
    w = weight.detach().float().reshape(weight.shape[0], -1)
    out = {}
    for method in METHODS:
        q = WeightQuantizer(bits, method, PerChannel(), num_groups=w.shape[0])
        with torch.no_grad():
            out[method] = float((q(w) - w).pow(2).sum() / w.pow(2).sum())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=1000, help="weights with fewer elements are left out")
    args = parser.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"]
    rows, total, energy = [], {m: 0.0 for m in METHODS}, 0.0
    for name, w in state.items():
        if w.dim() < 2 or not name.endswith(("weight", "weight_v")) or w.numel() < args.min_size:
            continue
        err = relative_errors(w, args.bits)
        e = float(w.float().pow(2).sum())
        energy += e
        for m in METHODS:
            total[m] += err[m] * e
        rows.append((name, w.numel(), err))
    print(f"| weight | elements | {' | '.join(METHODS)} | balanced / lsq |")
    print("|---|---:|" + "---:|" * (len(METHODS) + 1))
    for name, n, err in rows:
        print(f"| {name} | {n} | " + " | ".join(f"{err[m]:.4f}" for m in METHODS)
              + f" | {err['balanced'] / err['lsq']:.3f} |")
    overall = {m: total[m] / energy for m in METHODS}
    print(f"| all ({len(rows)} weights, energy-weighted) | {sum(n for _, n, _ in rows)} | "
          + " | ".join(f"{overall[m]:.4f}" for m in METHODS) + f" | {overall['balanced'] / overall['lsq']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
