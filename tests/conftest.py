"""Shared fixtures: tiny fairseq VGGTransformer models built through fairseq's own parser and task, and the
recipe's smoke run (a tiny generated corpus, fp32 and QAT checkpoints trained by fairseq-train)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

import fairseq_quant  # noqa: E402,F401  (registers with fairseq)
from fairseq import options, tasks  # noqa: E402

VOCAB = 40
TINY_ARCH = [
    "--vggblock-enc-config", "[(8, 3, 2, 2, True)]",
    "--transformer-enc-config", "((32, 2, 64, True, 0.1, 0.1, 0.1),) * 2",
    "--enc-output-dim", "32", "--tgt-embed-dim", "32",
    "--conv-dec-config", "((32, 3, True),) * 2",
    "--transformer-dec-config", "((32, 2, 64, True, 0.1, 0.1, 0.1),) * 2",
    "--input-feat-per-channel", "80",
]


@pytest.fixture(scope="session")
def dict_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict")
    (path / "dict.txt").write_text("".join(f"tok{i} {100 - i}\n" for i in range(VOCAB)))
    return path


def build_tiny(dict_dir, arch="quant_vggtransformer_small", extra=()):
    """(task, model, args) for a tiny VGGTransformer with the given quantization flags."""
    arch_args = TINY_ARCH
    if "enc_" in arch:  # encoder-only models take no decoder options
        arch_args = TINY_ARCH[:4] + ["--enc-output-dim", "32", "--input-feat-per-channel", "80"]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(dict_dir), "--task", "speech_recognition", "--arch", arch, "--criterion", "cross_entropy_acc",
        *arch_args, *extra,
    ])
    task = tasks.setup_task(args)
    return task, task.build_model(args), args


def fbank_batch(seed=0, bsz=3, frames=(120, 100, 80), tgt_len=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, max(frames), 80, generator=g)
    lengths = torch.tensor(frames)
    prev = torch.randint(4, VOCAB + 4, (bsz, tgt_len), generator=g)
    return x, lengths, prev


ROOT = Path(__file__).resolve().parents[1]
SMOKE_ROWS = ("fp32", "ptq-w2-sym-channel", "ptq-w8a8", "dynamic-int8", "qat-w4a8", "qat-mixed2a8",
              "runtime-mixed2a8")  # the smoke size's


def run(cmd, timeout=900, **kw):
    """Run a command from the repository root as a user would (fresh environment, 2 threads)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["OMP_NUM_THREADS"] = "2"
    env.update(kw.pop("env", {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """(workdir, stdout) of ``recipes.librispeech.run --size smoke``: data/, fp32/, ptq/, qat/{qat-w4a8,qat-mixed2a8}/
    and eval/ROW/ for every row.

    ``FAIRSEQ_QUANT_SMOKE_DIR=DIR`` runs it in DIR instead of a fresh temporary directory (the runner skips
    finished stages: a quick way to rerun these tests while working on them)."""
    reuse = os.environ.get("FAIRSEQ_QUANT_SMOKE_DIR")
    work = Path(reuse) if reuse else tmp_path_factory.mktemp("smoke")
    proc = run([sys.executable, "-m", "recipes.librispeech.run", "--size", "smoke", "--workdir", str(work)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def calibrate_tiny(model, seeds=(0, 1)):
    """The calibration phase on a build_tiny model: its activation ranges from fbank batches, in eval mode (the
    model's mode is restored)."""
    from fairseq_quant.quant import calibrate

    was_training = model.training
    model.eval()
    calibrate(model, [fbank_batch(seed) for seed in seeds], forward=lambda m, b: m(*b))
    model.train(was_training)
    if hasattr(model, "quant_calibrated"):
        model.quant_calibrated.fill_(True)
    return model


@pytest.fixture(scope="session")
def tiny_model_file(dict_dir, tmp_path_factory):
    """A tiny exported model (w8a8, no CTC head: the attention decoder only), for runtime API and CLI tests."""
    from fairseq_quant.export.exporter import build_model_file, decode_only_spm
    from fairseq_quant_runtime import fqm

    torch.manual_seed(0)
    task, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "8", "--quant-act-bits", "8"])
    calibrate_tiny(model, seeds=(0,))
    d = task.target_dictionary
    special = {"eos": d.eos(), "pad": d.pad(), "unk": d.unk(), "bos": d.bos()}
    spm = decode_only_spm(ROOT / "recipes/librispeech/reference/spm.model")
    file, _ = build_model_file(model.eval(), list(d.symbols), spm, special, {}, {})
    path = tmp_path_factory.mktemp("model") / "tiny.fqm"
    fqm.write(path, file)
    return path
