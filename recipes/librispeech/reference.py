"""The shipped reference model: checkpoint averaging, the bundle (model, SentencePiece model, dict.txt,
manifest.json with provenance and checksums) and its verification.

A bundle directory holds:
- ``model.pt``: a fairseq checkpoint of the averaged fp32 model, without optimizer or criterion state;
- ``spm.model``: the SentencePiece model of the training transcripts; ``dict.txt``: fairseq's dictionary;
- ``manifest.json``: bundle format version, the corpus generation parameters, the exact training command,
  the commit it was trained at, updates, training wall time, the machine, the measured WER per subset and
  the sha256 of every other file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from fairseq_quant_runtime.files import atomic_output

BUNDLE_VERSION = 1
BUNDLE_FILES = ("model.pt", "spm.model", "dict.txt")
DEFAULT_BUNDLE = Path(__file__).parent / "reference"


class BundleError(ValueError):
    """A reference bundle is missing, incomplete, or does not match its manifest."""


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def interval_checkpoints(save_dir: Path) -> list[Path]:
    """fairseq's interval checkpoints ``checkpoint_E_U.pt`` of save_dir, by update number."""
    found = []
    for path in Path(save_dir).glob("checkpoint_*_*.pt"):
        parts = path.stem.split("_")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append((int(parts[2]), path))
    return [p for _, p in sorted(found)]


def averaging_candidates(save_dir: Path) -> list[Path]:
    """The interval checkpoints, then checkpoint_last.pt when it is newer than all of them: fairseq writes no
    interval checkpoint at an epoch's end, so the final model of a training that stops there (at --max-update
    or its time limit) is only in checkpoint_last.pt."""
    from fairseq_quant.compat import load_torch_file

    paths = interval_checkpoints(save_dir)
    last = Path(save_dir) / "checkpoint_last.pt"
    if last.is_file():
        def updates(path):
            return load_torch_file(path)["optimizer_history"][-1]["num_updates"]

        if not paths or updates(last) > updates(paths[-1]):
            paths.append(last)
    return paths


def average_checkpoints(save_dir: Path, count: int, out: Path) -> Path:
    """Average the model weights of the last ``count`` checkpoints (``averaging_candidates``; 0: copy the last
    checkpoint), drop optimizer and criterion state, and write ``out`` atomically."""
    import torch
    from fairseq_quant.compat import load_torch_file

    paths = averaging_candidates(save_dir)[-count:] if count > 0 else []
    if count > 0 and len(paths) < count:
        raise BundleError(f"{save_dir}: {len(paths)} checkpoints to average, {count} needed")
    if not paths:
        paths = [Path(save_dir) / "checkpoint_last.pt"]
    states = [load_torch_file(p) for p in paths]
    merged = states[-1]
    model = {}
    for key, value in merged["model"].items():
        if value.is_floating_point():
            model[key] = sum(s["model"][key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            model[key] = value
    merged["model"] = model
    attach_ctc_head(merged, states)
    merged.pop("last_optimizer_state", None)
    merged.pop("criterion", None)
    merged.setdefault("extra_state", {})["averaged_checkpoints"] = [p.name for p in paths]
    out = Path(out)
    with atomic_output(out) as tmp:
        torch.save(merged, tmp)
    return out


def attach_ctc_head(merged: dict, states: list[dict]) -> bool:
    """Make the criterion's training-only CTC head (``--ctc-encoder-dim``) part of the model: its weights,
    averaged over ``states``, become the model's ``ctc_proj`` and the arch its ``*_ctc`` variant (for joint
    CTC/attention decoding). False, and ``merged`` unchanged, where there is no such head or no such arch."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    import fairseq_quant  # noqa: F401  (registers the *_ctc archs)

    heads = [s.get("criterion") or {} for s in states]
    cfg = (merged.get("cfg") or {}).get("model")
    arch = getattr(cfg, "arch", None) if cfg is not None else None
    if "ctc_proj.weight" in merged["model"] or not all("ctc_proj.weight" in h for h in heads) or \
            f"{arch}_ctc" not in ARCH_MODEL_REGISTRY:
        return False
    for key in heads[-1]:
        if key.startswith("ctc_proj."):
            merged["model"][key] = sum(h[key].double() for h in heads).div(len(heads)).to(heads[-1][key].dtype)
    cfg.arch = cfg._name = f"{arch}_ctc"
    merged.setdefault("extra_state", {})["ctc_head_from_criterion"] = True
    return True


def machine_description() -> dict:
    """What the model was trained on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__, "system": platform.platform()}


def git_commit(repo: Path) -> dict:
    """HEAD of the repository and whether the working tree had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def copy_init_bundle(bundle: str | os.PathLike, dest: Path) -> Path:
    """Copy a verified bundle into ``dest`` (once, atomically) for a training that continues from it, so
    that replacing the original bundle later does not change what the training started from."""
    bundle, dest = Path(bundle), Path(dest)
    manifest = load_manifest(bundle)
    if dest.is_dir():
        kept = load_manifest(dest)
        if kept["sha256"] != manifest["sha256"]:
            raise BundleError(f"{dest} holds a different bundle than {bundle}: the training in this work "
                              f"directory continues from the former; use a new --workdir")
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in BUNDLE_FILES + ("manifest.json",):
        shutil.copyfile(bundle / name, tmp / name)
    os.replace(tmp, dest)
    return dest


def write_bundle(bundle: Path, work: Path, args) -> Path:
    """Assemble the bundle from a train_reference work directory; replaces ``bundle`` atomically."""
    import torch
    from fairseq_quant.compat import load_torch_file

    from recipes.librispeech.generate_corpus import size_params
    from fairseq_quant.evaluate import find_spm_model

    work, bundle = Path(work), Path(bundle)
    model_path = work / "model.pt"
    if not model_path.is_file():
        raise BundleError(f"{model_path} not found: run the average stage first")
    state = load_torch_file(model_path)
    train_dir = work / "train"
    started = json.loads((train_dir / "command.json").read_text())
    repo = Path(__file__).resolve().parents[2]

    def portable(command):
        return [c.replace(sys.executable, "python").replace(str(work), "$WORKDIR").replace(str(repo), "$REPO")
                for c in command]

    runs = [portable(c) for c in started.get("runs", [started["command"]])]
    extra = state.get("extra_state", {})
    wer = {}
    wer_json = work / "eval" / "wer.json"
    if wer_json.is_file():
        summary = json.loads(wer_json.read_text())
        wer = {"beam": summary["beam"], "ctc_weight": summary.get("ctc_weight", 0.0), "subsets": {r["subset"]: {k: r[k] for k in (
            "utterances", "words", "substitutions", "deletions", "insertions", "wer")} for r in summary["results"]}}
    manifest = {
        "bundle_version": BUNDLE_VERSION,
        "arch": state["cfg"]["model"].arch if state.get("cfg") is not None else None,
        "parameters": sum(v.numel() for v in state["model"].values() if v.is_floating_point()),
        "corpus": size_params(args.corpus, args.seed),
        "vocab_size": args.vocab_size,
        "training": {
            "command": runs[-1],  # the run that finished (fairseq resumes; its time limit spans the runs)
            **({"earlier_runs": runs[:-1]} if len(runs) > 1 else {}),
            "commit": started["commit"],  # the code the training started from
            "dirty": started["dirty"],
            "updates": int(state["optimizer_history"][-1]["num_updates"]),
            "epoch": int(extra.get("train_iterator", {}).get("epoch", 0)),
            "wall_time_s": round(float(extra.get("previous_training_time", 0.0)), 1),
            "averaged_checkpoints": extra.get("averaged_checkpoints", []),
            # trained as the criterion's CTC head (--ctc-encoder-dim), made the model's when averaged
            **({"ctc_head_from_criterion": True} if extra.get("ctc_head_from_criterion") else {}),
            "machine": machine_description(),
        },
        "wer": wer,
    }
    init = work / "init" / "manifest.json"
    if init.is_file():  # continued from an earlier bundle: totals over the chain, the earlier training kept
        earlier = json.loads(init.read_text())
        training = manifest["training"]
        training["updates_this_run"] = training["updates"]
        training["wall_time_this_run_s"] = training["wall_time_s"]
        training["updates"] += earlier["training"]["updates"]
        training["wall_time_s"] = round(training["wall_time_s"] + earlier["training"]["wall_time_s"], 1)
        training["continued_from"] = {**earlier["training"], "model_sha256": earlier["sha256"]["model.pt"],
                                      "wer": earlier.get("wer", {})}
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(model_path, tmp / "model.pt")
    shutil.copyfile(find_spm_model(work / "data"), tmp / "spm.model")
    shutil.copyfile(work / "data" / "dict.txt", tmp / "dict.txt")
    manifest["sha256"] = {name: sha256(tmp / name) for name in BUNDLE_FILES}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    old = bundle.with_name(bundle.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if bundle.exists():
        os.replace(bundle, old)
    os.replace(tmp, bundle)
    shutil.rmtree(old, ignore_errors=True)
    return bundle


def load_manifest(bundle: str | os.PathLike = DEFAULT_BUNDLE, check_files: bool = True) -> dict:
    """The bundle's manifest, after checking its version and every file's sha256."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{bundle}: no manifest.json (not a reference bundle; train one with "
                          f"python -m recipes.librispeech.train_reference)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("bundle_version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {manifest.get('bundle_version')!r}, expected {BUNDLE_VERSION}")
    if check_files:
        for name in BUNDLE_FILES:
            file = bundle / name
            if not file.is_file():
                raise BundleError(f"{bundle}: {name} is missing")
            expected = manifest.get("sha256", {}).get(name)
            if sha256(file) != expected:
                raise BundleError(f"{file}: sha256 does not match manifest.json (corrupted or replaced file)")
    return manifest
