"""Data-parallel QAT: two fairseq-train workers on CPU (gloo) fine-tune the smoke run's fp32 model at w4a8
with distillation, both starting from the same calibrated checkpoint (scripts/calibrate.py); every quantizer buffer
and parameter must end identical on both workers (running ranges follow the global batch), equal to what rank 0
saved, and the saved checkpoint must decode."""
import json
import os
import socket
import subprocess
import sys

import torch
from conftest import ROOT, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantizer_state(state_dict):
    return {k: v for k, v in state_dict.items() if "_quantizer." in k or k == "quant_calibrated"}


def run_workers(tmp_path, train_args: list[str]) -> list[str]:
    """Two fairseq-train workers (tests/dp_worker.py, gloo on CPU, fairseq's legacy data-parallel backend) with
    ``train_args``; each dumps its quantizer state to tmp_path/rank{r}.pt. Returns both logs, both having exited 0."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
        env.update(OMP_NUM_THREADS="1", FAIRSEQ_QUANT_DUMP=str(tmp_path / f"rank{rank}.pt"))
        cmd = [sys.executable, "tests/dp_worker.py", *train_args, "--cpu", "--distributed-world-size", "2",
               "--distributed-rank", str(rank), "--distributed-no-spawn",
               "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-backend", "gloo",
               "--ddp-backend", "legacy_ddp"]
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs


def test_data_parallel_qat_keeps_quantizer_state_identical_on_every_worker(smoke, tmp_path):
    work, _ = smoke
    fp32 = work / "fp32" / "checkpoint_best.pt"
    strategy = ROOT / "recipes/librispeech/strategies/w4a8.yaml"
    start = tmp_path / "calibrated.pt"
    proc = run([sys.executable, "scripts/calibrate.py", "--checkpoint", str(fp32), "--data", str(work / "data"),
                "--strategy", str(strategy), "--batches", "2", "--batch-size", "4", "--out", str(start)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    save = tmp_path / "qat"
    logs = run_workers(tmp_path, [
        str(work / "data"), "--user-dir", "fairseq_quant", "--task", "speech_recognition",
        "--arch", "quant_vggtransformer_small_ctc", "--quant-strategy", str(strategy),
        "--finetune-from-model", str(start), "--criterion", "quant_cross_entropy_acc",
        "--teacher-path", str(fp32), "--kd-weight", "0.5", "--optimizer", "adam", "--lr", "1e-4",
        "--batch-size", "4", "--required-batch-size-multiple", "1", "--max-update", "6",
        "--save-interval-updates", "2", "--save-dir", str(save), "--num-workers", "0", "--log-format", "simple",
        "--train-subset", "train", "--valid-subset", "dev-clean", "--seed", "1"])
    assert f"loading pretrained model from {start}: " in logs[0] and "num_updates 6" in logs[0]  # rank 0 logs
    assert "wbits 4" in logs[0]  # the criterion finds the quant model inside the data-parallel wrappers

    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert workers[0].keys() == workers[1].keys() and len(workers[0]) > 200
    assert [k for k in workers[0] if not torch.equal(workers[0][k], workers[1][k])] == []
    saved = quantizer_state(torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"])
    assert saved.keys() == workers[0].keys()
    assert all(torch.equal(saved[k], workers[0][k]) for k in saved)
    # the running ranges did move after calibration (update 2) on both workers alike
    calibrated = torch.load(save / "checkpoint_1_2.pt", map_location="cpu", weights_only=False)["model"]
    ranges = [k for k in saved if k.endswith("input_quantizer.hi")]
    assert sum(not torch.equal(saved[k], calibrated[k]) for k in ranges) > len(ranges) // 2

    proc = run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(save / "checkpoint_last.pt"),
                "--data", str(work / "data"), "--subsets", "test-clean", "--beam", "2", "--max-len-b", "20",
                "--out", str(tmp_path / "eval")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "wer.json").read_text())["results"][0]
    assert result["subset"] == "test-clean" and result["utterances"] == 6 and result["words"] > 0
    assert len((tmp_path / "eval" / "test-clean.hyp").read_text().splitlines()) == 6


def test_data_parallel_co_training_keeps_every_precision_identical_on_every_worker(smoke, tmp_path):
    """Co-training runs several forwards per step (the extra ones on the model inside the data-parallel wrapper);
    both workers end with identical quantizer state, every precision's step included, and the 2-bit steps moved.
    (fairseq's pytorch_ddp backend cannot run on CPU: it passes GPU device ids; the legacy backend all-reduces the
    summed gradients after the backward.)"""
    work, _ = smoke
    fp32 = work / "fp32" / "checkpoint_best.pt"
    strategy = tmp_path / "co.yaml"
    strategy.write_text("default: {weight_bits: 8, act_bits: 8, co_weight_bits: [2]}\n")
    start = tmp_path / "calibrated.pt"
    proc = run([sys.executable, "scripts/calibrate.py", "--checkpoint", str(fp32), "--data", str(work / "data"),
                "--strategy", str(strategy), "--batches", "2", "--batch-size", "4", "--out", str(start)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = run_workers(tmp_path, [
        str(work / "data"), "--user-dir", "fairseq_quant", "--task", "speech_recognition",
        "--arch", "quant_vggtransformer_small_ctc", "--quant-strategy", str(strategy), "--finetune-from-model", str(start),
        "--criterion", "quant_cross_entropy_acc", "--co-precisions", "2", "--co-kd-weight", "1.0",
        "--optimizer", "adam", "--lr", "1e-4", "--batch-size", "4", "--required-batch-size-multiple", "1",
        "--max-update", "3", "--save-dir", str(tmp_path / "co"), "--num-workers", "0", "--log-format", "simple",
        "--train-subset", "train", "--valid-subset", "dev-clean", "--seed", "1", "--disable-validation"])
    assert "num_updates 3" in logs[0] and "loss_w2" in logs[0]
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert any(k.endswith("weight_quantizer.step_w2") for k in workers[0])
    assert [k for k in workers[0] if not torch.equal(workers[0][k], workers[1][k])] == []
    saved = torch.load(tmp_path / "co" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    start_state = torch.load(start, map_location="cpu", weights_only=False)["model"]
    moved = [k for k in saved if k.endswith("step_w2") and not torch.equal(saved[k], start_state[k])]
    assert moved  # the 2-bit steps were trained
