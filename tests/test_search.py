"""Strategy search (scripts/search_strategy.py): the exact solver, unit sizes against the quantization report,
the Hutchinson estimator, and the whole search on the smoke run's fp32 checkpoint with real post-training
quantization, calibration, teacher-forced loss and beam-search WER: deterministic ranking, resume after a
real SIGKILL, budget, zero decodes in proxy mode, the same ranking through Ray."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, build_tiny, run
from fairseq_quant.quant import Strategy, build_report, quantize_model
from fairseq_quant.search import (SearchError, UnitCosts, allocation_strategy, model_units, pareto_front,
                                  solve_allocations, spearman, unit_costs)
from fairseq_quant.search.runner import SearchConfig, candidate_strategy, unit_act_rules, unit_strategy
from fairseq_quant.search.space import act_overrides
from fairseq_quant.search.proxy import hutchinson_traces

SCRIPT = str(ROOT / "scripts" / "search_strategy.py")


# -- pure parts ----------------------------------------------------------------------------------------

def test_milp_k_best_under_budget():
    # three units; a (100 weights) and b (100) are cheap to lower, c (200) is sensitive
    costs = UnitCosts(numel={"a": 100, "b": 100, "c": 200},
                      bytes={u: {2: n * 2 / 8, 4: n * 4 / 8} for u, n in (("a", 100), ("b", 100), ("c", 200))},
                      constant_bytes=10.0, sq_error={})
    score = {"a": {2: 1.0, 4: 0.0}, "b": {2: 2.0, 4: 0.0}, "c": {2: 10.0, 4: 0.0}}
    found = solve_allocations(["a", "b", "c"], [2, 4], score, costs, budget_bits=3.0, k=5)
    # 3 bits average allows 200 weights at 4 bits: c alone, or a and b together; then fewer at 4 bits
    assert found == [({"a": 2, "b": 2, "c": 4}, 3.0), ({"a": 4, "b": 4, "c": 2}, 10.0),
                     ({"a": 2, "b": 4, "c": 2}, 11.0), ({"a": 4, "b": 2, "c": 2}, 12.0),
                     ({"a": 2, "b": 2, "c": 2}, 13.0)]
    for allocation, _ in found:
        assert costs.avg_bits(allocation) <= 3.0
    # the MB budget: 10 bytes + packed weights; 110 bytes = everything at 2 bits (100) + 10
    found = solve_allocations(["a", "b", "c"], [2, 4], score, costs, budget_mb=110e-6)
    assert found == [({"a": 2, "b": 2, "c": 2}, 13.0)]
    with pytest.raises(SearchError, match="no allocation fits the budget"):
        solve_allocations(["a", "b", "c"], [2, 4], score, costs, budget_mb=100e-6)


def test_milp_order_of_second_best():
    costs = UnitCosts(numel={"a": 100, "b": 100}, bytes={"a": {2: 25, 4: 50}, "b": {2: 25, 4: 50}},
                      constant_bytes=0.0, sq_error={})
    score = {"a": {2: 1.0, 4: 0.0}, "b": {2: 3.0, 4: 0.0}}
    found = solve_allocations(["a", "b"], [2, 4], score, costs, budget_bits=3.0, k=4)
    assert found == [({"a": 2, "b": 4}, 1.0), ({"a": 4, "b": 2}, 3.0), ({"a": 2, "b": 2}, 4.0)]


def test_spearman_and_pareto():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None
    assert pareto_front([(1.0, 50.0), (2.0, 40.0), (2.5, 45.0), (4.0, 30.0), (4.0, 35.0)]) == [0, 1, 3]


def test_hutchinson_trace_of_a_known_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    c0, c1 = torch.rand(3, 4), torch.rand(2, 3)

    def loss_fn(m, batch):  # Hessian diagonal 2 * c: the trace of each block is exact for Rademacher probes
        return (c0 * m[0].weight ** 2).sum() + (c1 * m[1].weight ** 2).sum()

    traces, hvps = hutchinson_traces(model, loss_fn, [None, None], {"first": ("0",), "second": ("1",)}, probes=3)
    assert hvps == 6
    assert traces["first"] == pytest.approx(float(2 * c0.sum()), rel=1e-5)
    assert traces["second"] == pytest.approx(float(2 * c1.sum()), rel=1e-5)


@pytest.mark.parametrize("kind", ["layer", "block", "module"])
def test_unit_sizes_add_up_to_the_quantization_report(dict_dir, kind):
    def fresh():
        torch.manual_seed(0)
        return build_tiny(dict_dir, "vggtransformer_small")[1]

    units = model_units(fresh(), kind)
    costs = unit_costs(fresh, units, [2, 4, 8], 8)
    allocation = {u.name: (2, 4, 8)[i % 3] for i, u in enumerate(units)}
    model = fresh()
    quantize_model(model, allocation_strategy(units, allocation, 8))
    report = build_report(model)
    assert costs.mb(allocation) == pytest.approx(report.quant_mb, rel=1e-9)
    assert costs.avg_bits(allocation) == pytest.approx(report.avg_weight_bits, rel=1e-9)
    names = [u.name for u in units]
    expected = {  # VGG front end, input projection, 2 encoder layers, output projection, embedding, ...
        "layer": ["encoder.conv_layers", "encoder.transformer_layers.0", "encoder.transformer_layers.1",
                  "encoder.transformer_layers.2", "encoder.transformer_layers.3", "decoder.embed_tokens",
                  "decoder.conv_layers", "decoder.layers.0", "decoder.layers.1", "decoder.fc_out"],
        "block": ["encoder.conv_layers", "encoder.transformer_layers.0", "encoder.transformer_layers.1.self_attn",
                  "encoder.transformer_layers.1.ffn", "encoder.transformer_layers.2.self_attn",
                  "encoder.transformer_layers.2.ffn", "encoder.transformer_layers.3", "decoder.embed_tokens",
                  "decoder.conv_layers", "decoder.layers.0.self_attn", "decoder.layers.0.encoder_attn",
                  "decoder.layers.0.ffn", "decoder.layers.1.self_attn", "decoder.layers.1.encoder_attn",
                  "decoder.layers.1.ffn", "decoder.fc_out"],
        "module": ["encoder.conv_layers.0.layers.0", "encoder.conv_layers.0.layers.3", "encoder.transformer_layers.0",
                   "encoder.transformer_layers.1.self_attn", "encoder.transformer_layers.1.fc1"],
    }[kind]
    assert names[:len(expected)] == expected
    assert names[-1] == "decoder.fc_out" and len(names) == {"layer": 10, "block": 16, "module": 22}[kind]


def test_a_base_strategy_gives_every_candidate_its_weight_method_and_activation_rules(dict_dir):
    """--base-strategy: balanced grids everywhere (binary at 1 bit), and the outlier site's 16-bit input survives
    the allocation, whatever width it gives the module."""
    torch.manual_seed(0)
    model = build_tiny(dict_dir, "vggtransformer_small")[1]
    units = model_units(model, "layer")
    modules = [m for u in units for m in u.modules]
    base = Strategy.from_dict({"default": {"weight_bits": 2, "act_bits": 8, "weight_method": "balanced"},
                               "rules": [{"match": "decoder.fc_out", "act_bits": 16, "weight_bits": 8}]})
    rules = act_overrides(base, modules)
    assert rules == {"decoder.fc_out": {"act_bits": 16, "act_method": "minmax", "act_granularity": "tensor"}}
    # a rule counting from the end of a module list (the recipe's out16 strategies) is bound to the searched modules
    assert [m for m in modules if m.startswith("decoder.layers.")] == ["decoder.layers.0", "decoder.layers.1"]
    relative = Strategy.from_dict({"default": {"weight_bits": 2, "act_bits": 8},
                                   "rules": [{"match": "decoder.layers.-1", "act_bits": 16}]})
    assert act_overrides(relative, modules) == {
        "decoder.layers.1": {"act_bits": 16, "act_method": "minmax", "act_granularity": "tensor"}}
    cfg = SearchConfig(checkpoint="-", data="-", out="-", budget_bits=3, base_strategy=base.to_dict())
    assert unit_act_rules(cfg, units) == rules
    for fc_out_bits in (2, 4, 1):  # the default width (2) and others
        allocation = {u.name: fc_out_bits if u.name == "decoder.fc_out" else 2 for u in units}
        strategy = candidate_strategy(units, allocation, cfg)
        assert (strategy.default.weight_bits, strategy.default.weight_method, strategy.default.act_bits) == (
            2, "balanced", 8)
        assert [(r.pattern, r.spec.weight_bits, r.spec.weight_method, r.spec.act_bits) for r in strategy.rules] == [
            ("re:decoder\\.fc_out(\\..*)?", fc_out_bits, "binary" if fc_out_bits == 1 else "balanced", 16)]
        fresh = build_tiny(dict_dir, "vggtransformer_small")[1]
        quantize_model(fresh, strategy)
        fc_out = dict(fresh.named_modules())["decoder.fc_out"]
        assert (fc_out.weight_quantizer.bits, fc_out.input_quantizer.bits) == (fc_out_bits, 16)
        other = dict(fresh.named_modules())["decoder.layers.0.fc1"]
        assert (other.weight_quantizer.bits, other.weight_quantizer.method, other.input_quantizer.bits) == (
            2, "balanced", 8)
    # the one-unit strategies of the sensitivity pass carry them too
    unit = next(u for u in units if u.name == "decoder.fc_out")
    assert unit_strategy(unit, 4, 8, rules, "balanced")["rules"][0] == {
        "match": "re:decoder\\.fc_out(\\..*)?", "weight_bits": 4, "act_bits": 16, "granularity": "channel",
        "weight_method": "balanced", "act_method": "minmax", "act_granularity": "tensor"}
    assert unit_strategy(unit, 4, 8)["rules"][0]["act_bits"] == 8
    # a base whose rules decide none of the searched modules, or whose activations are not the search's
    cfg.base_strategy = {"default": {"weight_bits": 8, "act_bits": 8}, "rules": [{"match": "nothing.here",
                                                                                  "act_bits": 16}]}
    with pytest.raises(SearchError, match="base strategy: no rule matches a module of the searched units"):
        unit_act_rules(cfg, units)
    cfg.base_strategy = {"default": {"weight_bits": 2, "act_bits": 6}}
    with pytest.raises(SearchError, match="base strategy: its default must be per-channel weights with 8-bit "
                                          "activations \\(the search's --act-bits\\), got channel weights, 6-bit"):
        cfg.check()


# -- the search on a real (tiny) checkpoint ---------------------------------------------------------------

BASE_ARGS = ["--bits", "2,4", "--budget-bits", "3", "--top-k", "2", "--beam", "1", "--max-len-a", "0",
             "--max-len-b", "12", "--probes", "2", "--proxy-batches", "1", "--calib-batches", "1"]


def search(smoke, out, *extra, timeout=600, env=None):
    work, _ = smoke
    cmd = [sys.executable, SCRIPT, "--checkpoint", str(work / "fp32" / "checkpoint_best.pt"), "--data",
           str(work / "data"), "--out", str(out), *BASE_ARGS, *extra]
    return run(cmd, timeout=timeout, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})


def table(out: Path) -> list[dict]:
    """candidates.csv without the timing column (measured seconds differ from run to run)."""
    with open(out / "candidates.csv") as f:
        return [{k: v for k, v in row.items() if k != "cost_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def fast_run(smoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "fast"
    proc = search(smoke, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_search_outputs_budget_and_strategies(fast_run, smoke):
    out, proc = fast_run
    summary = json.loads((out / "summary.json").read_text())
    rows = table(out)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["search", "search", "uniform", "uniform"]
    assert [r["rank"] for r in rows] == ["1", "2", "", ""]
    for r in rows[:2]:
        assert float(r["avg_weight_bits"]) <= 3.0 and r["fits_budget"] == "True"
        lo, wer, hi = float(r["wer_lo"]), float(r["dev_wer"]), float(r["wer_hi"])
        assert lo <= wer <= hi
    assert [r["name"] for r in rows[2:]] == ["uniform-w2", "uniform-w4"]
    assert float(rows[2]["avg_weight_bits"]) == 2.0 and float(rows[3]["avg_weight_bits"]) == 4.0
    assert rows[3]["fits_budget"] == "False"
    # fast mode: fp32 + 2 searched + 2 uniform decodes; one teacher-forced pass per unit and width
    units = len(summary["units"])
    assert summary["costs"]["decodes"] == 5
    assert summary["costs"]["tf_passes"] == 1 + 2 * units + 4
    assert summary["costs"]["hvps"] == 2
    assert "Cost: 5 full dev decodes" in proc.stdout
    assert (out / "search.png").stat().st_size > 10000
    best = Strategy.from_yaml(out / "strategies" / "best.yaml").to_dict()
    assert best == Strategy.from_yaml(out / "strategies" / f"{rows[0]['name']}.yaml").to_dict()
    md = (out / "candidates.md").read_text()
    assert "| 1 | search-" in md and "uniform-w2" in md
    # each strategy YAML loads as is and gives the model the table's average bits
    from fairseq_quant.evaluate import load_checkpoint

    for r in rows:
        model, _ = load_checkpoint(smoke[0] / "fp32" / "checkpoint_best.pt", smoke[0] / "data")
        report = quantize_model(model, Strategy.from_yaml(out / "strategies" / f"{r['name']}.yaml"))
        assert report.avg_weight_bits == pytest.approx(float(r["avg_weight_bits"]), abs=1e-4)
        assert report.quant_mb == pytest.approx(float(r["model_mb"]), abs=1e-6)


def test_resume_after_sigkill_redoes_nothing_and_ranks_the_same(fast_run, smoke, tmp_path):
    ref_out, _ = fast_run
    out = tmp_path / "killed"
    work, _ = smoke
    cmd = [sys.executable, SCRIPT, "--checkpoint", str(work / "fp32" / "checkpoint_best.pt"), "--data",
           str(work / "data"), "--out", str(out), *BASE_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = out / "state.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if state.exists() and len(json.loads(state.read_text())["results"]) >= 8:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the search wrote no progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, no chance to clean up
        proc.wait()
    before = json.loads(state.read_text())["results"]  # still valid JSON: written atomically
    assert 8 <= len(before) < len(json.loads((ref_out / "state.json").read_text())["results"])
    resumed = search(smoke, out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = json.loads(state.read_text())["results"]
    for key, result in before.items():
        assert after[key] == result  # not run again (a rerun would store new timings)
    assert f"{len(before)} of {len(after)} measurements reused" in resumed.stdout
    # the same seed gives the same ranking, WERs and intervals as the uninterrupted run
    assert table(out) == table(ref_out)
    assert set(after) == set(json.loads((ref_out / "state.json").read_text())["results"])


def test_proxy_only_mode_makes_zero_decodes(smoke, tmp_path):
    out = tmp_path / "proxy"
    proc = search(smoke, out, "--mode", "proxy", "--objective", "hessian")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["costs"]["decodes"] == 0
    assert all(r.get("decodes", 0) == 0 and "utts" not in r
               for r in json.loads((out / "state.json").read_text())["results"].values())
    assert "Cost: 0 full dev decodes" in proc.stdout
    rows = table(out)
    assert [r["kind"] for r in rows] == ["search", "search", "uniform", "uniform"]
    assert all(r["dev_wer"] == "" for r in rows)
    assert float(rows[0]["predicted"]) <= float(rows[1]["predicted"])
    assert float(rows[0]["avg_weight_bits"]) <= 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_gives_the_same_ranking_as_local_workers(fast_run, smoke, tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (pip install 'fairseq_quant[search]'); the Ray path is not tested")
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_bin, "ray is importable but its 'ray' command is missing"
    port = free_port()
    temp = Path(f"/tmp/fqray{os.getpid()}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "1",
                            "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        out = tmp_path / "ray"
        proc = search(smoke, out, "--ray-address", f"127.0.0.1:{port}", env={"RAY_USAGE_STATS_ENABLED": "0"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    assert table(out) == table(fast_run[0])


@pytest.mark.parametrize("args, message", [
    (["--budget-bits", "1.5"], "invalid budget 1.5 average weight bits: below the smallest candidate width 2"),
    (["--budget-bits", "0.1", "--bits", "2,9"], "unknown weight bit width 9; candidate widths are integers 1..8"),
    (["--budget-mb", "-1"], "invalid budget -1.0 MB: must be positive"),
    ([], "give a budget: --budget-bits (average weight bits) and/or --budget-mb"),
    (["--budget-bits", "3", "--base-strategy", str(ROOT / "recipes/librispeech/strategies/w8a8-out16.yaml"),
      "--co-trained", "co.pt"], "--base-strategy: a co-trained checkpoint keeps the quantizers it was trained with; "
                                "put the settings in its strategy instead"),
])
def test_bad_input_is_one_clear_line(smoke, tmp_path, capsys, args, message):
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_strategy", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    work, _ = smoke
    rc = script.main(["--checkpoint", str(work / "fp32" / "checkpoint_best.pt"), "--data", str(work / "data"),
                      "--out", str(tmp_path / "bad"), "--bits", "2,4", *args])
    assert rc == 2
    assert capsys.readouterr().err == f"search_strategy: error: {message}\n"
    assert not (tmp_path / "bad").exists()


def test_missing_checkpoint_is_one_line_without_traceback(smoke, tmp_path):
    work, _ = smoke
    proc = run([sys.executable, SCRIPT, "--checkpoint", "/nonexistent/model.pt", "--data", str(work / "data"),
                "--out", str(tmp_path / "bad"), "--budget-bits", "2.5"], timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "search_strategy: error: checkpoint not found: /nonexistent/model.pt"
    assert "Traceback" not in proc.stderr
