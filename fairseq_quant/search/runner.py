"""The strategy search: sensitivities -> exact allocation -> refinement by real dev WER -> outputs.

Every measurement is a task run by :func:`fairseq_quant.search.evaluator.run_task` in a worker (local
processes, or Ray tasks with ``ray_address``). Its result goes into ``OUT/state.json`` (written to a
temporary file and renamed) as soon as it arrives, keyed by a hash of the task, so a run killed at any
point resumes with only the unfinished tasks.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from fairseq_quant_runtime.decoding import DecodingConfig, DecodingError
from fairseq_quant_runtime.files import atomic_output, atomic_write

from .solver import pareto_front, solve_allocations, spearman
from .space import SearchError, Unit, UnitCosts, act_overrides, allocation_strategy, strategy_yaml

MODES = ("full", "fast", "proxy")
OBJECTIVES = ("wer", "loss", "hessian", "fisher")
STATE_VERSION = 1


@dataclass
class SearchConfig:
    checkpoint: str
    data: str
    out: str
    dev_subset: str = "dev-clean"
    dev_utts: int | None = None  # the first N utterances of the dev subset only
    bits: tuple = (2, 3, 4, 8)
    act_bits: int | None = 8
    unit: str = "layer"
    budget_bits: float | None = None
    budget_mb: float | None = None
    mode: str = "fast"
    objective: str | None = None  # default: wer in full mode, loss otherwise
    top_k: int = 4
    probes: int = 8
    proxy_batches: int = 2
    calib_batches: int = 4
    beam: int = DecodingConfig.beam
    max_len_a: float = DecodingConfig.max_len_a
    max_len_b: int = DecodingConfig.max_len_b
    seed: int = 0
    workers: int = 1
    threads: int = 1
    ray_address: str | None = None
    greedy: bool = False
    compare: tuple = ()  # strategy YAML files evaluated in the same table (e.g. a hand-written one)
    # a strategy (as Strategy.to_dict) every candidate builds on: its default's weight method (per channel, at
    # act_bits) and its rules' activation fields, kept whatever weight bits the search gives a module: e.g.
    # w2a8-balanced-out16.yaml, balanced grids and the outlier site at 16 bits (space.act_overrides)
    base_strategy: dict | None = None
    # a multi-precision co-trained checkpoint: candidates are evaluated on it at their allocation (its own
    # activation ranges, no calibration, no retraining) instead of quantizing `checkpoint` post-training
    co_trained: str | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        try:
            DecodingConfig(beam=self.beam, max_len_a=self.max_len_a, max_len_b=self.max_len_b)
        except DecodingError as err:
            raise SearchError(str(err)) from None
        if self.mode not in MODES:
            raise SearchError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not self.bits:
            raise SearchError("no candidate bit widths")
        for b in self.bits:
            if not isinstance(b, int) or not 1 <= b <= 8:
                raise SearchError(f"unknown weight bit width {b!r}; candidate widths are integers 1..8")
        if self.budget_bits is None and self.budget_mb is None:
            raise SearchError("give a budget: --budget-bits (average weight bits) and/or --budget-mb")
        if self.budget_bits is not None and not (min(self.bits) <= self.budget_bits):
            raise SearchError(f"invalid budget {self.budget_bits} average weight bits: below the smallest "
                              f"candidate width {min(self.bits)}")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise SearchError(f"invalid budget {self.budget_mb} MB: must be positive")
        base = self.base()
        if base is not None and (base.default.granularity != "channel" or base.default.act_bits != self.act_bits):
            raise SearchError(f"base strategy: its default must be per-channel weights with {self.act_bits or 'fp32'}"
                              f"-bit activations (the search's --act-bits), got {base.default.granularity} weights, "
                              f"{base.default.act_bits or 'fp32'}-bit activations")
        if self.objective is None:
            self.objective = "wer" if self.mode == "full" else "loss"
        if self.objective not in OBJECTIVES:
            raise SearchError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.objective == "wer" and self.mode != "full":
            raise SearchError("objective wer needs the measured WER of every unit: --mode full")
        if self.greedy and self.mode == "proxy":
            raise SearchError("the greedy search decodes every candidate: not in proxy-only mode")
        if self.top_k < 1 or self.workers < 1 or self.probes < 1:
            raise SearchError("--top-k, --workers and --probes must be at least 1")
        for path in self.compare:
            if not Path(path).is_file():
                raise SearchError(f"strategy to compare not found: {path}")
        if not Path(self.checkpoint).is_file():
            raise SearchError(f"checkpoint not found: {self.checkpoint}")
        if self.co_trained is not None and not Path(self.co_trained).is_file():
            raise SearchError(f"co-trained checkpoint not found: {self.co_trained}")
        if not (Path(self.data) / f"{self.dev_subset}.json").is_file():
            raise SearchError(f"no manifest {Path(self.data) / (self.dev_subset + '.json')} in the data directory")

    def base(self):
        """The base strategy (a :class:`fairseq_quant.quant.Strategy`), or None."""
        if self.base_strategy is None:
            return None
        from ..quant import Strategy

        return Strategy.from_dict(self.base_strategy, source="base strategy")

    def worker_config(self, data: str) -> dict:
        """What a measurement depends on (and the key of the state file)."""
        return {"checkpoint": str(Path(self.checkpoint).resolve()), "data": str(Path(data).resolve()),
                "dev_subset": self.dev_subset, "dev_utts": self.dev_utts, "calib_batches": self.calib_batches,
                "beam": self.beam, "max_len_a": self.max_len_a, "max_len_b": self.max_len_b, "seed": self.seed,
                "threads": self.threads,
                **({"co_trained": str(Path(self.co_trained).resolve())} if self.co_trained else {})}


# -- state and execution ----------------------------------------------------------------------------------

def task_key(task: dict) -> str:
    return hashlib.sha1(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]


class State:
    """Finished measurements, on disk after each one (``state.json``)."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        self.results: dict[str, dict] = {}
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("config") != config:
                diff = sorted(k for k in set(config) | set(stored.get("config", {}))
                              if stored.get("config", {}).get(k) != config.get(k))
                raise SearchError(f"{path} holds a search with other settings ({', '.join(diff)}); "
                                  "use another --out or delete it")
            self.results = stored["results"]
        self.reused = len(self.results)

    def save(self) -> None:
        atomic_write(self.path, json.dumps({"version": STATE_VERSION, "config": self.config,
                                            "results": self.results}, sort_keys=True) + "\n")


class Executor:
    """Runs tasks in local worker processes, or as Ray tasks when ``ray_address`` is given."""

    def __init__(self, worker_config: dict, workers: int = 1, ray_address: str | None = None):
        self.worker_config = worker_config
        self.ray = None
        self.pool = None
        if ray_address:
            try:
                import ray
            except ImportError:
                raise SearchError("--ray-address needs Ray: pip install 'fairseq_quant[search]'") from None
            ray.init(address=None if ray_address == "local" else ray_address, log_to_driver=False,
                     include_dashboard=False if ray_address == "local" else None, ignore_reinit_error=True)
            from .evaluator import run_task

            self.ray = ray
            self.remote = ray.remote(num_cpus=1, max_retries=2)(run_task)
        else:
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))

    def run(self, tasks: list[dict], state: State, label: str = "") -> list[dict]:
        """Results of ``tasks`` in order; the finished ones come from ``state``, the others are run and saved."""
        keys = [task_key(t) for t in tasks]
        todo = {k: t for k, t in zip(keys, tasks) if k not in state.results}
        done = len(set(keys)) - len(todo)
        total = len(set(keys))
        if todo:
            print(f"[search] {label}: {len(todo)} to run, {done} already done", flush=True)
        if self.ray is not None:
            pending = {self.remote.remote(self.worker_config, t): k for k, t in todo.items()}
            while pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    k = pending.pop(ref)
                    self._store(state, k, todo[k], self.ray.get(ref), label, total)
        elif todo:
            from .evaluator import run_task

            futures = {self.pool.submit(run_task, self.worker_config, t): k for k, t in todo.items()}
            while futures:
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for f in finished:
                    k = futures.pop(f)
                    self._store(state, k, todo[k], f.result(), label, total)
        return [state.results[k] for k in keys]

    @staticmethod
    def _store(state: State, key: str, task: dict, result: dict, label: str, total: int) -> None:
        state.results[key] = {**result, "task": task}
        state.save()
        what = task.get("name") or task["kind"]
        wer = f" WER {result['wer']:.2f}" if "wer" in result else ""
        loss = f" loss {result['loss']:.4f}" if "loss" in result else ""
        print(f"[search] {label} {sum(1 for _ in state.results)}: {what}{wer}{loss} ({result['seconds']:.1f} s)",
              flush=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.ray is not None:
            self.ray.shutdown()


# -- the search -----------------------------------------------------------------------------------------

def subset_data_dir(data: Path, subset: str, n: int | None, out: Path) -> Path:
    """``data`` itself, or (``n``) a directory beside the outputs whose ``subset`` manifest holds only the
    first ``n`` utterances (everything else linked)."""
    if not n:
        return data
    target = out / "data"
    target.mkdir(parents=True, exist_ok=True)
    for p in data.iterdir():
        link = target / p.name
        if p.name != f"{subset}.json" and not link.exists():
            os.symlink(p.resolve(), link)
    utts = json.loads((data / f"{subset}.json").read_text())["utts"]
    if n > len(utts):
        raise SearchError(f"--dev-utts {n}: {subset} has only {len(utts)} utterances")
    first = dict(list(utts.items())[:n])
    text = json.dumps({"utts": first}, indent=1) + "\n"
    path = target / f"{subset}.json"
    if not path.exists() or path.read_text() != text:
        atomic_write(path, text)
    return target


def unit_strategy(unit: Unit, bits: int, act_bits, act_rules: dict[str, dict] | None = None,
                  weight_method: str = "lsq") -> dict:
    """Only ``unit`` quantized (weights ``bits`` with ``weight_method``, binary at 1 bit; its activations
    ``act_bits`` but where ``act_rules`` say otherwise), everything else fp32."""
    act_rules = act_rules or {}
    return {"default": {"weight_bits": "fp32", "act_bits": "fp32"},
            "rules": [{"match": f"re:{re.escape(m)}(\\..*)?", "weight_bits": bits, "act_bits": act_bits,
                       "granularity": "channel", "weight_method": "binary" if bits == 1 else weight_method,
                       **act_rules.get(m, {})}
                      for m in unit.modules]}


def alloc_name(units: list[Unit], allocation: dict[str, int]) -> str:
    return "".join(str(allocation[u.name]) for u in units)


@dataclass
class Candidate:
    name: str
    kind: str  # search, uniform, greedy
    allocation: dict
    avg_bits: float
    mb: float
    predicted: float | None = None
    result: dict | None = None


def run_search(cfg: SearchConfig) -> dict:
    """The whole search; returns the summary written to ``OUT/summary.json``."""
    cfg.check()
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = subset_data_dir(Path(cfg.data), cfg.dev_subset, cfg.dev_utts, out)
    wcfg = cfg.worker_config(str(data))
    state = State(out / "state.json", {**wcfg, "bits": list(cfg.bits), "act_bits": cfg.act_bits, "unit": cfg.unit,
                                       **({"base_strategy": cfg.base_strategy} if cfg.base_strategy else {}),
                                       "probes": cfg.probes, "proxy_batches": cfg.proxy_batches})
    ex = Executor(wcfg, cfg.workers, cfg.ray_address)
    decode = cfg.mode != "proxy"
    try:
        # with a co-trained checkpoint the costs task also returns each unit's co-trained widths (a key of its own,
        # so a search state saved before widths existed recomputes it)
        costs_res = ex.run([{"kind": "costs", "unit": cfg.unit, "bits": sorted(cfg.bits), "act_bits": cfg.act_bits,
                             **({"weight_method": weight_method(cfg)} if cfg.base_strategy else {}),
                             **({"co_widths": True} if cfg.co_trained else {})}],
                           state, "sizes")[0]
        units = [Unit(n, tuple(m)) for n, m in costs_res["units"]]
        widths = unit_widths(cfg, units, costs_res.get("widths"))
        act_rules = unit_act_rules(cfg, units)
        costs = UnitCosts.from_dict(costs_res["costs"])
        proxy = ex.run([{"kind": "proxy", "units": [[u.name, list(u.modules)] for u in units], "probes": cfg.probes,
                         "batches": cfg.proxy_batches, "seed": cfg.seed}], state, "proxies")[0]
        # sensitivities: one unit at a time, post-training, calibrated
        base = ex.run([{"kind": "eval", "name": "fp32", "strategy": None, "decode": decode}], state, "fp32")[0]
        sens_tasks = [{"kind": "eval", "name": f"{u.name}@w{b}",
                       "strategy": unit_strategy(u, b, cfg.act_bits, act_rules, weight_method(cfg)),
                       "decode": cfg.mode == "full"} for u in units for b in widths[u.name]]
        sens_res = ex.run(sens_tasks, state, "sensitivity")
        sens = sensitivities(units, widths, costs, proxy, base, sens_res)
        score = {u.name: {b: sens[(u.name, b)][cfg.objective] for b in widths[u.name]} for u in units}
        correlations = {p: spearman([sens[k][p] for k in sens if sens[k]["wer"] is not None],
                                    [sens[k]["wer"] for k in sens if sens[k]["wer"] is not None])
                        for p in ("loss", "hessian", "fisher")}
        # exact allocation, k best
        found = solve_allocations([u.name for u in units], sorted(cfg.bits), score, costs, cfg.budget_bits,
                                  cfg.budget_mb, k=cfg.top_k)
        cands = [Candidate(f"search-{i + 1}", "search", a, costs.avg_bits(a), costs.mb(a), obj)
                 for i, (a, obj) in enumerate(found)]
        for b in sorted(cfg.bits):
            if not all(b in widths[u.name] for u in units):
                continue  # not a width of every unit (a co-trained checkpoint's first and last layers)
            a = {u.name: b for u in units}
            cands.append(Candidate(f"uniform-w{b}", "uniform", a, costs.avg_bits(a), costs.mb(a),
                                   sum(score[u][b] for u in score)))
        tasks = [eval_task(c, units, cfg, decode) for c in cands]
        for path in cfg.compare:
            from ..quant import Strategy

            strategy = Strategy.from_yaml(path)
            cands.append(Candidate(Path(path).stem, "given", {}, 0.0, 0.0))
            tasks.append({"kind": "eval", "name": Path(path).stem, "strategy": strategy.to_dict(), "decode": decode})
        results = ex.run(tasks, state, "candidates")
        for c, r in zip(cands, results):
            c.result = r
            if c.kind == "given":  # sizes from the quantized model's own report
                c.avg_bits, c.mb = r["avg_weight_bits"], r["model_mb"]
        greedy = None
        if cfg.greedy:
            greedy = greedy_search(ex, state, units, widths, costs, cfg)
            cands.append(greedy["candidate"])
    finally:
        ex.close()
    summary = write_outputs(cfg, out, units, costs, sens, correlations, base, cands, state, greedy,
                            time.perf_counter() - started)
    return summary


def weight_method(cfg: SearchConfig) -> str:
    """The weight method of every candidate: the base strategy's default's, else LSQ."""
    base = cfg.base()
    return "lsq" if base is None else base.default.weight_method


def unit_act_rules(cfg: SearchConfig, units) -> dict[str, dict]:
    """The activation fields the base strategy's rules give the units' modules (none without a base strategy;
    one whose rules decide none of them is an error)."""
    base = cfg.base()
    if base is None:
        return {}
    rules = act_overrides(base, [m for u in units for m in u.modules])
    if base.rules and not rules:
        raise SearchError("base strategy: no rule matches a module of the searched units")
    return rules


def candidate_strategy(units, allocation: dict, cfg: SearchConfig, description: str = "") -> Strategy:
    return allocation_strategy(units, allocation, cfg.act_bits, description, weight_method=weight_method(cfg),
                               act_rules=unit_act_rules(cfg, units))


def eval_task(c: Candidate, units, cfg: SearchConfig, decode: bool) -> dict:
    strategy = candidate_strategy(units, c.allocation, cfg)
    return {"kind": "eval", "name": c.name, "strategy": strategy.to_dict(), "decode": decode}


def fits(cfg: SearchConfig, avg_bits: float, mb: float) -> bool:
    return ((cfg.budget_bits is None or avg_bits <= cfg.budget_bits + 1e-9)
            and (cfg.budget_mb is None or mb <= cfg.budget_mb + 1e-9))


def unit_widths(cfg: SearchConfig, units, co_widths: dict | None) -> dict[str, list[int]]:
    """Each unit's candidate weight widths: every ``--bits`` width, or with a co-trained checkpoint those its modules
    were co-trained at (``co_widths``, from the costs task); a unit left with none is an error naming it."""
    widths = {u.name: sorted(co_widths[u.name] if co_widths is not None else cfg.bits) for u in units}
    empty = [name for name, w in widths.items() if not w]
    if empty:
        raise SearchError(f"units {empty[:3]} were co-trained at none of the widths --bits {','.join(map(str, cfg.bits))}")
    return widths


def sensitivities(units, widths: dict[str, list[int]], costs, proxy, base, sens_res) -> dict:
    from .proxy import second_order_score

    out = {}
    it = iter(sens_res)
    for u in units:
        for b in widths[u.name]:
            r = next(it)
            wer = None
            if "errors" in r and "errors" in base:
                wer = 100.0 * (r["errors"] - base["errors"]) / max(base["errors"], 1)  # relative WER change %
            out[(u.name, b)] = {
                "unit": u.name, "bits": b, "numel": costs.numel[u.name], "wer": wer,
                "loss": r["loss"] - base["loss"],
                "hessian": second_order_score(proxy["hessian_trace"][u.name], costs.numel[u.name],
                                              costs.sq_error[u.name][b]),
                "fisher": second_order_score(proxy["fisher_trace"][u.name], costs.numel[u.name],
                                             costs.sq_error[u.name][b]),
            }
    return out


def greedy_search(ex: Executor, state: State, units, widths: dict[str, list[int]], costs: UnitCosts,
                  cfg: SearchConfig) -> dict:
    """One unit at a time, every step decoding each unit lowered to its next width; the step keeps the
    lowest dev WER (ties: the larger saving, then forward order). Stops when the budget holds."""
    alloc = {u.name: widths[u.name][-1] for u in units}
    decodes, steps = 0, 0
    current = None
    while not fits(cfg, costs.avg_bits(alloc), costs.mb(alloc)):
        options = []
        for u in units:
            i = widths[u.name].index(alloc[u.name])
            if i > 0:
                options.append({**alloc, u.name: widths[u.name][i - 1]})
        if not options:
            raise SearchError("greedy search: no lower widths left and the budget still does not hold")
        cands = [Candidate(f"greedy-{steps + 1}-{alloc_name(units, a)}", "greedy", a, costs.avg_bits(a), costs.mb(a))
                 for a in options]
        res = ex.run([eval_task(c, units, cfg, True) for c in cands], state, f"greedy step {steps + 1}")
        decodes += len(res)
        best = min(range(len(cands)), key=lambda i: (res[i]["errors"], cands[i].mb, i))
        alloc, current = cands[best].allocation, cands[best]
        current.result = res[best]
        steps += 1
    current.name = "greedy"
    return {"candidate": current, "decodes": decodes, "steps": steps}


# -- outputs ----------------------------------------------------------------------------------------------

def _utts(result):
    from ..stats import UttErrors

    return [UttErrors(i, w, e, 0, 0) for i, w, e in result["utts"]]


def cost_totals(results: list[dict]) -> dict:
    keys = ("decodes", "tf_passes", "calib_batches", "hvps", "grad_passes")
    tot = {k: sum(r.get(k, 0) for r in results) for k in keys}
    tot["worker_seconds"] = round(sum(r.get("seconds", 0.0) for r in results), 1)
    return tot


def write_outputs(cfg, out: Path, units, costs, sens, correlations, base, cands, state: State, greedy,
                  wall: float) -> dict:
    from ..stats import paired_relative_change, wer_interval

    decoded = "utts" in base
    budget = " and ".join(x for x in (f"{cfg.budget_bits} average weight bits" if cfg.budget_bits else "",
                                       f"{cfg.budget_mb} MB" if cfg.budget_mb else "") if x)
    searched = [c for c in cands if c.kind == "search"]
    key = (lambda c: (c.result["errors"], c.predicted, c.name)) if decoded else (lambda c: (c.predicted, c.name))
    ranked = sorted(searched, key=key)
    uniform_fit = [c for c in cands if c.kind == "uniform" and fits(cfg, c.avg_bits, c.mb)]
    uniform_ref = max(uniform_fit, key=lambda c: c.avg_bits) if uniform_fit else None
    rows = []
    order = ranked + [c for c in cands if c.kind != "search"]
    for c in order:
        r = c.result
        row = {"rank": ranked.index(c) + 1 if c in ranked else "", "name": c.name, "kind": c.kind,
               "avg_weight_bits": round(c.avg_bits, 4), "model_mb": round(c.mb, 6),
               "fits_budget": fits(cfg, c.avg_bits, c.mb), "predicted": c.predicted,
               "tf_loss": round(r["loss"], 5), "cost_s": r["seconds"],
               "allocation": alloc_name(units, c.allocation) if c.allocation else "-"}
        if decoded:
            ci = wer_interval([_utts(r)])
            ch = paired_relative_change([_utts(base)], [_utts(r)])
            row.update(dev_wer=round(r["wer"], 2), wer_lo=round(ci.lo, 2), wer_hi=round(ci.hi, 2),
                       change_vs_fp32=round(ch.value, 2), change_lo=round(ch.lo, 2), change_hi=round(ch.hi, 2))
            if uniform_ref is not None and c is not uniform_ref:
                cu = paired_relative_change([_utts(uniform_ref.result)], [_utts(r)])
                row.update(change_vs_uniform=round(cu.value, 2), uniform_lo=round(cu.lo, 2), uniform_hi=round(cu.hi, 2))
        rows.append(row)
        name = c.name
        if c.kind == "given":
            continue
        atomic_write(out / "strategies" / f"{name}.yaml",
                     strategy_yaml(candidate_strategy(units, c.allocation, cfg),
                                   f"{name} ({c.kind}): {c.avg_bits:.3f} average weight bits, {c.mb:.4f} MB; "
                                   f"units {', '.join(f'{u.name}={c.allocation[u.name]}' for u in units)}"))
    # CSV
    fields = ["rank", "name", "kind", "avg_weight_bits", "model_mb", "fits_budget", "dev_wer", "wer_lo", "wer_hi",
              "change_vs_fp32", "change_lo", "change_hi", "change_vs_uniform", "uniform_lo", "uniform_hi",
              "predicted", "tf_loss", "cost_s", "allocation"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    atomic_write(out / "candidates.csv", buf.getvalue())
    sbuf = io.StringIO()
    sw = csv.DictWriter(sbuf, fieldnames=["unit", "bits", "numel", "wer", "loss", "hessian", "fisher"])
    sw.writeheader()
    for v in sens.values():
        sw.writerow(v)
    atomic_write(out / "sensitivity.csv", sbuf.getvalue())
    # costs (every measurement of this search, also those of earlier, interrupted runs)
    all_results = list(state.results.values())
    totals = cost_totals(all_results)
    totals["wall_seconds_this_run"] = round(wall, 1)
    totals["measurements_reused"] = state.reused
    totals["measurements_total"] = len(all_results)
    # markdown
    md = [f"Strategy search on `{cfg.checkpoint}`, {cfg.dev_subset}"
          + (f" (first {cfg.dev_utts} utterances)" if cfg.dev_utts else "")
          + f", unit {cfg.unit}, widths {','.join(map(str, cfg.bits))}, activations {cfg.act_bits or 'fp32'} bits, "
          f"budget {budget}, mode {cfg.mode}, objective {cfg.objective}, seed {cfg.seed}."
          + (f" fp32 dev WER {base['wer']:.2f}%." if decoded else f" fp32 teacher-forced loss {base['loss']:.4f}."),
          ""]
    if decoded:
        md += ["| rank | candidate | avg weight bits | MB | fits | dev WER % [95% CI] | change vs fp32 [95% CI] | "
               f"vs {uniform_ref.name if uniform_ref else 'uniform'} [95% CI] | predicted | cost s |",
               "|---:|---|---:|---:|:-:|---:|---:|---:|---:|---:|"]
        for row in rows:
            vs_u = (f"{row['change_vs_uniform']:+.1f}% [{row['uniform_lo']:+.1f}, {row['uniform_hi']:+.1f}]"
                    if "change_vs_uniform" in row else "-")
            md.append(f"| {row['rank']} | {row['name']} | {row['avg_weight_bits']:.3f} | {row['model_mb']:.4f} | "
                      f"{'yes' if row['fits_budget'] else 'no'} | {row['dev_wer']:.2f} [{row['wer_lo']:.2f}, "
                      f"{row['wer_hi']:.2f}] | {row['change_vs_fp32']:+.1f}% [{row['change_lo']:+.1f}, "
                      f"{row['change_hi']:+.1f}] | {vs_u} | {_fmt(row['predicted'])} | {row['cost_s']:.1f} |")
    else:
        md += ["| rank | candidate | avg weight bits | MB | fits | teacher-forced dev loss | predicted | cost s |",
               "|---:|---|---:|---:|:-:|---:|---:|---:|"]
        for row in rows:
            md.append(f"| {row['rank']} | {row['name']} | {row['avg_weight_bits']:.3f} | {row['model_mb']:.4f} | "
                      f"{'yes' if row['fits_budget'] else 'no'} | {row['tf_loss']:.4f} | {_fmt(row['predicted'])} | "
                      f"{row['cost_s']:.1f} |")
    md += ["", "Allocations (unit widths in forward order: " + ", ".join(u.name for u in units) + "):", ""]
    md += [f"- {row['name']}: {row['allocation']}" for row in rows]
    corr = ", ".join(f"{p} {v:+.3f}" if v is not None else f"{p} n/a" for p, v in correlations.items())
    md += ["", f"Spearman rank correlation with the measured relative WER change of each unit at each width "
               f"({len(sens)} pairs): {corr if any(v is not None for v in correlations.values()) else 'not measured (needs --mode full)'}."]
    md += ["", f"Cost: {totals['decodes']} full dev decodes, {totals['tf_passes']} teacher-forced dev passes, "
               f"{totals['calib_batches']} calibration batches, {totals['hvps']} Hessian-vector products, "
               f"{totals['grad_passes']} gradient passes; {totals['worker_seconds']:.0f} s of worker time, "
               f"{totals['wall_seconds_this_run']:.0f} s wall time this run ({totals['measurements_reused']} of "
               f"{totals['measurements_total']} measurements reused from an earlier run)."]
    if greedy:
        g = greedy["candidate"]
        best = ranked[0]
        md += ["", f"Greedy one-unit-at-a-time search: dev WER {g.result['wer']:.2f}% at {g.avg_bits:.3f} bits after "
                   f"{greedy['steps']} steps and {greedy['decodes']} decodes; the search's best "
                   f"{best.result['wer']:.2f}% ({best.result['wer'] - g.result['wer']:+.2f} absolute)."]
    atomic_write(out / "candidates.md", "\n".join(md) + "\n")
    if decoded:
        plot(cfg, rows, base, out / "search.png")
    best = ranked[0]
    atomic_write(out / "strategies" / "best.yaml", strategy_yaml(
        candidate_strategy(units, best.allocation, cfg),
        f"best of the search ({best.name}): {best.avg_bits:.3f} average weight bits, {best.mb:.4f} MB; units "
        + ", ".join(f"{u.name}={best.allocation[u.name]}" for u in units)))
    summary = {"config": asdict(cfg), "units": [u.name for u in units], "ranking": [c.name for c in ranked],
               "best": {"name": ranked[0].name, "allocation": ranked[0].allocation,
                        "strategy": str(out / "strategies" / f"{ranked[0].name}.yaml")},
               "rows": rows, "spearman": correlations, "costs": totals,
               "fp32": {k: base.get(k) for k in ("wer", "loss", "model_mb")}}
    if greedy:
        summary["greedy"] = {"wer": greedy["candidate"].result["wer"], "decodes": greedy["decodes"],
                             "steps": greedy["steps"], "avg_bits": greedy["candidate"].avg_bits,
                             "allocation": greedy["candidate"].allocation}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print("\n".join(md), flush=True)
    return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def plot(cfg, rows, base, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [(r["model_mb"], r["dev_wer"]) for r in rows]
    style = {"search": ("o", "tab:blue"), "uniform": ("s", "tab:red"), "greedy": ("^", "tab:green"),
             "given": ("D", "tab:purple")}
    for r in rows:
        m, col = style[r["kind"]]
        ax.errorbar(r["model_mb"], r["dev_wer"], yerr=[[r["dev_wer"] - r["wer_lo"]], [r["wer_hi"] - r["dev_wer"]]],
                    fmt=m, color=col, capsize=2, markersize=5)
        ax.annotate(r["name"], (r["model_mb"], r["dev_wer"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", label="Pareto front")
    ax.axhline(base["wer"], color="black", linewidth=0.8, label=f"fp32 {base['wer']:.2f}%")
    if cfg.budget_mb:
        ax.axvline(cfg.budget_mb, color="gray", linestyle=":", label="budget")
    ax.set_xscale("log")
    ax.set_xlabel("model size, MB (packed weights + scales; log scale)")
    ax.set_ylabel(f"dev WER % ({cfg.dev_subset}), 95% CI")
    ax.set_title("searched allocations (blue), uniform (red squares), greedy (green), given strategies (purple)",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


__all__ = ["Executor", "SearchConfig", "State", "run_search", "subset_data_dir", "task_key"]
