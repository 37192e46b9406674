"""Fake quantization cost in fairseq decoding and QAT steps: the library's fast paths against the composite of
differentiable operations they replace (same values bit for bit; tests/test_quantizers.py checks that).

    python benchmarks/fake_quant_speed.py --checkpoint exp/default/qat/qat-w2a8/checkpoint_best.pt \
        --fp32 recipes/librispeech/reference/model.pt --data exp/default/data --utts 200

Prints one table: beam-5 decoding of the first --utts test-clean utterances and forward+backward of a QAT training
batch, for the fp32 model, the quantized model with the composite quantizers, and with the fast paths, with the
ratios taken side by side in this run.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_quant.quant import quantizers  # noqa: E402
from fairseq_quant.quant.quantizers import round_ste  # noqa: E402


def composite_zero_point(x, lo, hi, bits):
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels).detach()
    return (torch.clamp(round_ste(x / scale) + zero_point, 0, levels) - zero_point) * scale


def composite_symmetric(x, scale, bits):
    qmin, qmax = quantizers.signed_range(bits)
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def composite_affine(x, lo, hi, bits):
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    return torch.clamp(round_ste((x - lo) / scale), 0, levels) * scale + lo


@contextmanager
def composite_quantizers():
    """The quantizers as they were before the fast paths (module attributes are looked up at call time)."""
    saved = {name: getattr(quantizers, name) for name in ("fake_quant_zero_point", "fake_quant_symmetric",
                                                         "fake_quant_affine")}
    quantizers.fake_quant_zero_point = composite_zero_point
    quantizers.fake_quant_symmetric = composite_symmetric
    quantizers.fake_quant_affine = composite_affine
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(quantizers, name, fn)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a QAT checkpoint")
    parser.add_argument("--fp32", type=Path, required=True, help="its fp32 model, for reference")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--subset", default="test-clean")
    parser.add_argument("--utts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best counts)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import fairseq_quant  # noqa: F401  (registers the archs)
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_quant.evaluate import load_checkpoint

    def batches(task):
        task.load_dataset(args.subset)
        dataset = task.dataset(args.subset)
        itr = task.get_batch_iterator(dataset=dataset, max_tokens=60000, max_positions=(1e9, 1e9))
        out, n = [], 0
        for sample in itr.next_epoch_itr(shuffle=False):
            out.append(sample)
            n += len(sample["id"])
            if n >= args.utts:
                break
        train_batch = next(iter(task.get_batch_iterator(dataset=dataset, max_tokens=8000, max_positions=(1e9, 1e9),
                                                        disable_iterator_cache=True)
                                .next_epoch_itr(shuffle=False)))
        return out, n, train_batch

    def best_of(fn):
        fn()  # warm-up: the allocator and the first-touch page faults of large activations
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def measure(path):
        model, task = load_checkpoint(path, args.data)
        samples, n, train_batch = batches(task)
        generator = SequenceGenerator([model], task.target_dictionary, beam_size=5, max_len_a=0.2, max_len_b=10)

        def decode():
            model.eval()
            with torch.no_grad():
                for sample in samples:
                    generator.generate([model], sample)

        def train_step():
            model.train()
            out = model(**train_batch["net_input"])
            model.get_normalized_probs(out, log_probs=True).float().sum().backward()
            model.zero_grad(set_to_none=True)

        return best_of(decode), best_of(train_step), n, len(train_batch["id"])

    rows = [("fp32", *measure(args.fp32))]
    with composite_quantizers():
        rows.append(("quantized, composite", *measure(args.checkpoint)))
    rows.append(("quantized, fast paths", *measure(args.checkpoint)))
    _, decode_base, step_base, n, batch = rows[1]
    print(f"\n{args.checkpoint}: {n} {args.subset} utterances, beam 5, {args.threads} thread(s); "
          f"training step: forward+backward of one batch of {batch} utterances (best of {args.repeats} after a warm-up)\n")
    print("| model | decode s | vs composite | vs fp32 | training step s | vs composite |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, decode_s, step_s, _, _ in rows:
        print(f"| {name} | {decode_s:.1f} | x{decode_base / decode_s:.2f} | x{rows[0][1] / decode_s:.2f} | "
              f"{step_s:.2f} | x{step_base / step_s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
