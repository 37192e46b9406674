"""Checkpoints load with ``weights_only=True`` and an allow-list of the argument and config classes fairseq
checkpoints hold: a checkpoint whose pickle names anything else (here, a call to ``os.system``) is refused with one
line, before any of its code runs, by every loading path (fairseq's, evaluation's, the plugin's own)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from fairseq_quant.compat import UNSAFE_PICKLE_ENV, load_torch_file
from fairseq_quant.quant.errors import CheckpointError

REFERENCE = ROOT / "recipes/librispeech/reference/model.pt"


class Payload:
    """Pickles as a call to os.system: loading the file as a full pickle runs the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious(tmp_path):
    state = torch.load(REFERENCE, map_location="cpu", weights_only=False)  # the trusted reference, then poisoned
    marker = tmp_path / "code-ran"
    state["extra_state"] = {"payload": Payload(marker)}
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    return path, marker


def test_a_checkpoint_with_a_code_pickle_is_refused_everywhere(malicious, tmp_path):
    from fairseq import checkpoint_utils

    from fairseq_quant.evaluate import load_checkpoint

    path, marker = malicious
    expected = rf"{path}: refused: the checkpoint's pickle names (posix|os)\.system"
    with pytest.raises(CheckpointError, match=expected):
        load_torch_file(path)
    with pytest.raises(CheckpointError, match=expected):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, tmp_path)
    assert not marker.exists()
    # the refusal says how to load a trusted file, and what that does
    with pytest.raises(CheckpointError, match=f"set {UNSAFE_PICKLE_ENV}=1 to load it as a full pickle "
                                              r"\(which runs any code it contains\)"):
        load_torch_file(path)


def test_the_scripts_refuse_it_in_one_line(malicious, tmp_path):
    path, marker = malicious
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", UNSAFE_PICKLE_ENV)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/quant_report.py"), "--checkpoint", str(path),
                           "--data", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode != 0 and not marker.exists()
    assert "refused: the checkpoint's pickle names" in proc.stderr.strip().splitlines()[-1]


def test_real_checkpoints_load_safely(tmp_path):
    """The shipped reference (argparse arguments) and a checkpoint with fairseq's omegaconf config (as the calibration
    phase writes them) load weights-only."""
    from omegaconf import OmegaConf

    state = load_torch_file(REFERENCE)
    assert set(state) >= {"model", "args"} and state["model"]["encoder.transformer_layers.5.weight"].shape == (128, 128)
    cfg = OmegaConf.create({"model": {"arch": "quant_vggtransformer_ref_ctc", "dropout": 0.0}, "task": {"data": "d"},
                            "common": {"seed": 1, "tags": [1, 2]}})
    path = tmp_path / "calibrated.pt"
    torch.save({"model": state["model"], "cfg": cfg, "args": state["args"]}, path)
    loaded = load_torch_file(path)
    assert loaded["cfg"].model.arch == "quant_vggtransformer_ref_ctc" and list(loaded["cfg"].common.tags) == [1, 2]
