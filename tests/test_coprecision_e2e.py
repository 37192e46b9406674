"""Multi-precision co-training end to end on the smoke recipe's model: calibrate with a co-training strategy,
fairseq-train with the criterion's co-training passes (stochastic precision, in-place distillation), an
interrupted run resumes exactly, and the convert phase writes an ordinary checkpoint at one allocation that
computes what the co-trained model computes there and passes the operand audit at its bits."""
import shutil
import sys

import pytest
import torch
from conftest import run

STRATEGY = """default: {weight_bits: 8, act_bits: 8, co_weight_bits: [2, 1]}
rules:
  - match: "encoder.conv_layers.*"
    co_weight_bits: [2]
  - match: "decoder.fc_out"
    co_weight_bits: null
"""


def train(work, start, strategy, save_dir, max_update):
    return run([sys.executable, "-m", "fairseq_cli.train", str(work / "data"), "--user-dir", "fairseq_quant",
                "--task", "speech_recognition", "--arch", "quant_vggtransformer_small_ctc",
                "--quant-strategy", str(strategy), "--finetune-from-model", str(start),
                "--criterion", "quant_cross_entropy_acc", "--co-precisions", "2,1", "--co-stochastic",
                "--co-kd-weight", "0.5", "--co-schedule", "1:2",
                "--optimizer", "adam", "--lr", "1e-4", "--batch-size", "8", "--required-batch-size-multiple", "1",
                "--max-update", str(max_update), "--save-dir", str(save_dir), "--save-interval-updates", "2",
                "--no-epoch-checkpoints", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
                "--train-subset", "train", "--valid-subset", "dev-clean", "--seed", "1", "--disable-validation"])


@pytest.fixture(scope="module")
def cotrained(smoke, tmp_path_factory):
    work, _ = smoke
    tmp = tmp_path_factory.mktemp("cotrain")
    strategy = tmp / "co.yaml"
    strategy.write_text(STRATEGY)
    start = tmp / "calibrated.pt"
    proc = run([sys.executable, "scripts/calibrate.py", "--checkpoint", str(work / "fp32" / "checkpoint_best.pt"),
                "--data", str(work / "data"), "--strategy", str(strategy), "--batches", "2", "--out", str(start)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = train(work, start, strategy, tmp / "straight", 4)
    assert straight.returncode == 0, straight.stderr[-3000:]
    return work, tmp, strategy, start, straight.stdout + straight.stderr


def test_co_training_logs_every_precision_and_joins_the_scheduled_one_later(cotrained):
    _, tmp, _, start, log = cotrained
    calibrated = torch.load(start, map_location="cpu", weights_only=False)["model"]
    assert bool(calibrated["encoder.transformer_layers.1.fc1.weight_quantizer.initialized_w2"])  # steps set up
    lines = [line for line in log.splitlines() if "| train_inner |" in line]
    assert len(lines) == 4
    assert all("loss_w2" in line and "loss_wmix" in line and "cokd_w2" in line for line in lines)
    assert "loss_w1" not in lines[0] and "loss_w1" not in lines[1] and "loss_w1" in lines[2]  # 1 bit from update 2


def test_an_interrupted_co_training_resumes_exactly(cotrained):
    """The straight run's checkpoint after update 2 (where an interrupted run would have left off) resumed to
    update 4 ends bit for bit where the straight run ended: weights, every precision's step, activation ranges."""
    work, tmp, strategy, start, _ = cotrained
    (tmp / "resumed").mkdir()
    interrupted = next((tmp / "straight").glob("checkpoint_*_2.pt"))
    shutil.copyfile(interrupted, tmp / "resumed" / "checkpoint_last.pt")
    second = train(work, start, strategy, tmp / "resumed", 4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Loaded checkpoint" in second.stdout + second.stderr
    a = torch.load(tmp / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def test_the_collapsed_checkpoint_computes_the_co_trained_model_at_that_precision(cotrained, tmp_path):
    import fairseq_quant  # noqa: F401
    from fairseq_quant.evaluate import load_checkpoint
    from fairseq_quant.quant.audit import audit
    from fairseq_quant.quant.coprecision import weight_precision

    work, tmp, _, _, _ = cotrained
    co_path = tmp / "straight" / "checkpoint_last.pt"
    out = tmp_path / "w2.pt"
    proc = run([sys.executable, "scripts/collapse_cotrained.py", "--checkpoint", str(co_path), "--bits", "2",
                "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"modules_per_precision": {"2":' in proc.stdout
    co_model, task = load_checkpoint(co_path, work / "data")
    model, _ = load_checkpoint(out, work / "data")
    task.load_dataset("dev-clean")
    dataset = task.dataset("dev-clean")
    sample = dataset.collater([dataset[i] for i in range(3)])
    with torch.no_grad(), weight_precision(co_model, 2):
        expected = co_model(**sample["net_input"])[0]
    with torch.no_grad():
        got = model(**sample["net_input"])[0]
    assert torch.allclose(got, expected, atol=1e-5)
    specs = model.quant_specs
    assert specs["encoder.transformer_layers.1.fc1"]["weight_bits"] == 2
    assert specs["decoder.fc_out"]["weight_bits"] == 8  # no co-training precision: kept its own
    assert all(s["co_weight_bits"] is None for s in specs.values())
    # every operand of the collapsed model is quantized: weights at 2 bits (8 where the strategy kept 8), 8-bit inputs
    with torch.no_grad():
        report = audit(model, lambda: model(**sample["net_input"]), weight_bits=8, act_bits=8)
    assert report.violations == [] and report.op_counts()["linear"] > 10
    fc1 = model.get_submodule("encoder.transformer_layers.1.fc1").weight_quantizer
    assert fc1.bits == 2 and max(len(torch.unique(r)) for r in fc1.granularity.group_view(fc1(
        model.get_submodule("encoder.transformer_layers.1.fc1").weight))) <= 4
    # a plain checkpoint is refused with one line
    proc = run([sys.executable, "scripts/collapse_cotrained.py", "--checkpoint", str(out), "--bits", "2",
                "--out", str(tmp_path / "again.pt")])
    assert proc.returncode == 2 and "not a co-trained checkpoint (no module has co_weight_bits)" in proc.stderr
    shutil.rmtree(tmp / "resumed", ignore_errors=True)


def test_the_search_over_a_co_trained_model_offers_each_unit_only_its_co_trained_widths(cotrained, tmp_path):
    """--co-trained with --bits 1,2,8: the VGG convolutions were co-trained at 8 and 2 bits only and the decoder's
    output projection at 8 only, so no sensitivity pass, candidate or uniform row gives them 1 bit (the benchmark's
    co-searched row used to die on its first such pass: 'encoder.conv_layers.0.layers.0: 1-bit weights are not a
    precision of the co-trained checkpoint')."""
    import csv
    import json

    work, tmp, _, _, _ = cotrained
    out = tmp_path / "co-search"
    proc = run([sys.executable, "scripts/search_strategy.py", "--checkpoint", str(work / "fp32" / "checkpoint_best.pt"),
                "--data", str(work / "data"), "--co-trained", str(tmp / "straight" / "checkpoint_last.pt"),
                "--bits", "1,2,8", "--budget-bits", "3", "--mode", "fast", "--top-k", "1", "--beam", "1",
                "--max-len-a", "0", "--max-len-b", "12", "--probes", "2", "--proxy-batches", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "sensitivity.csv") as f:
        passes = {(r["unit"], int(r["bits"])) for r in csv.DictReader(f)}
    units = {u for u, _ in passes}
    convs = {u for u in units if u.startswith("encoder.conv_layers")}
    assert convs and "decoder.fc_out" in units
    assert {b for u, b in passes if u in convs} == {2, 8}
    assert {b for u, b in passes if u == "decoder.fc_out"} == {8}
    assert {b for u, b in passes if u not in convs and u != "decoder.fc_out"} == {1, 2, 8}
    with open(out / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows if r["kind"] == "uniform"] == ["uniform-w8"]  # 1 and 2 bits fit not every unit
    best = json.loads((out / "summary.json").read_text())["best"]["allocation"]
    assert all(best[u] in (2, 8) for u in convs) and best["decoder.fc_out"] == 8
    assert float(next(r for r in rows if r["rank"] == "1")["avg_weight_bits"]) <= 3.0
