"""Compatibility fixes that make fairseq's speech_recognition example usable on current torch/torchaudio.

Each fix is small and named for the upstream breakage it repairs (see PLATFORM.md):
- the example imports itself as ``examples.speech_recognition``, a name the installed wheel does not
  provide; we expose ``fairseq/examples`` under exactly that one name (a second name would register its
  task twice);
- ``AsrDataset`` calls ``torchaudio.load_wav``, removed from torchaudio; we provide it on top of soundfile
  with the old semantics (int16-range float, [channels, frames], sample rate);
- fairseq checkpoints pickle argparse/omegaconf objects, which torch >= 2.6 refuses to load by default; we load
  them with ``weights_only=True`` and an allow-list of exactly those classes (torch's safe globals), so a
  checkpoint's pickle can never run code; ``FAIRSEQ_QUANT_UNSAFE_PICKLE=1`` loads full pickles instead (only for
  files you trust: a pickle can run any code);
- ``AsrDataset`` does not order utterances by length, so every batch pads to its longest utterance; we
  order them as fairseq's other audio datasets do;
- ``AsrDataset`` recomputes every utterance's fbank features in every epoch (about a quarter of a small
  model's training step on 2 CPU cores); we keep them in memory after the first epoch, up to
  ``FAIRSEQ_QUANT_FEATURE_CACHE_MB`` (default 4096; 0 disables);
- fairseq's ``all_gather_list`` allocates CUDA buffers, so data-parallel training on CPU (gloo) fails;
- fairseq broadcasts a loaded checkpoint to the other data-parallel ranks as a pickle that torch >= 2.6 loads
  weights only; they allow the same checkpoint classes as rank 0;
- fairseq re-raises any error from loading a checkpoint's model state as a bare ``Exception``; our
  one-line user errors are found behind it, and quant checkpoints carry their file name to the model;
- torch.load never checks a checkpoint's CRCs: a bit-flipped file loads garbage, a truncated one fails deep
  inside torch; every checkpoint is verified first and fails with one line.
"""
import importlib
import importlib.util
import logging
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import soundfile
import torch

from .quant.errors import CheckpointError, FairseqQuantError

logger = logging.getLogger(__name__)

EXAMPLES_NAME = "examples"


def fairseq_examples_dir() -> Path:
    """Directory of the examples shipped inside the installed fairseq package."""
    spec = importlib.util.find_spec("fairseq")
    if spec is None or spec.origin is None:
        raise ImportError("fairseq is not installed; install ve-fairseq==0.12.3 (see README)")
    path = Path(spec.origin).parent / "examples"
    if not (path / "speech_recognition" / "__init__.py").is_file():
        raise ImportError(f"fairseq at {path.parent} ships no examples/speech_recognition")
    return path


def expose_fairseq_examples() -> None:
    """Make ``examples.speech_recognition`` importable from the installed fairseq (idempotent)."""
    existing = sys.modules.get(EXAMPLES_NAME)
    target = fairseq_examples_dir()
    if existing is not None:
        locations = [Path(p).resolve() for p in getattr(existing, "__path__", [])]
        if target.resolve() not in locations:
            raise ImportError(
                f"a different module named '{EXAMPLES_NAME}' is already imported ({locations}); "
                "fairseq's speech_recognition example must be importable under exactly one name"
            )
        return
    spec = importlib.util.spec_from_file_location(
        EXAMPLES_NAME, target / "__init__.py", submodule_search_locations=[str(target)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[EXAMPLES_NAME] = module
    spec.loader.exec_module(module)


def load_wav(path, **_unused):
    """torchaudio<0.8 ``load_wav``: samples scaled to int16 range as float32 [C, T], and the rate."""
    try:
        data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise RuntimeError(f"cannot decode audio file {path}: {err}") from err
    if data.shape[0] == 0:
        raise RuntimeError(f"audio file {path} has no samples")
    return torch.from_numpy(np.ascontiguousarray(data.T).astype(np.float32)), rate


def install_torchaudio_load_wav() -> None:
    import torchaudio

    if not hasattr(torchaudio, "load_wav"):
        torchaudio.load_wav = load_wav


UNSAFE_PICKLE_ENV = "FAIRSEQ_QUANT_UNSAFE_PICKLE"


def checkpoint_globals() -> list:
    """The classes a fairseq checkpoint's pickle may name: its arguments (argparse) and config (omegaconf)."""
    import argparse
    import collections
    import typing

    from omegaconf import base, dictconfig, listconfig, nodes

    return [argparse.Namespace, dictconfig.DictConfig, listconfig.ListConfig, base.ContainerMetadata, base.Metadata,
            nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.EnumNode,
            typing.Any, collections.defaultdict, collections.OrderedDict, dict, list, tuple, set, int, float, str,
            bool, bytes]


def unsafe_pickles() -> bool:
    return os.environ.get(UNSAFE_PICKLE_ENV) == "1"


def load_torch_file(path, **kwargs):
    """``torch.load`` of a checkpoint: weights only plus :func:`checkpoint_globals` (a pickle that names anything
    else is refused with one line), unless ``FAIRSEQ_QUANT_UNSAFE_PICKLE=1``."""
    verify_checkpoint(path)
    kwargs.setdefault("map_location", "cpu")
    if unsafe_pickles():
        return torch.load(path, weights_only=False, **kwargs)
    with torch.serialization.safe_globals(checkpoint_globals()):
        try:
            return torch.load(path, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            raise CheckpointError(refusal(path, err)) from None


def refusal(path, err) -> str:
    named = re.findall(r"GLOBAL ([\w.]+)", str(err))
    what = (f"names {', '.join(dict.fromkeys(named))}" if named
            else f"cannot be loaded safely ({str(err).splitlines()[0]})")
    return (f"{path}: refused: the checkpoint's pickle {what}, which is not one of the argument and config classes a "
            f"fairseq checkpoint holds, so loading it could run code from the file. If you trust the file, set "
            f"{UNSAFE_PICKLE_ENV}=1 to load it as a full pickle (which runs any code it contains)")


def allow_fairseq_checkpoints() -> None:
    """fairseq's own ``torch.load`` calls load weights only with :func:`checkpoint_globals` allowed (see
    :func:`annotate_loaded_checkpoints`); ``FAIRSEQ_QUANT_UNSAFE_PICKLE=1`` loads full pickles instead."""
    if unsafe_pickles():
        logger.warning("%s=1: checkpoints are loaded as full pickles, which can run any code they contain; load "
                       "only files you trust", UNSAFE_PICKLE_ENV)
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"


def user_error(exc):
    """The FairseqQuantError behind ``exc``, if any: fairseq re-raises errors from loading a checkpoint's model
    state as a generic ``Exception("Cannot load model parameters ...")``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FairseqQuantError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Report fairseq_quant's user-input errors as one line instead of a traceback through fairseq."""
    previous = sys.excepthook
    if getattr(previous, "_fairseq_quant", False):
        return

    def hook(exc_type, exc, tb):
        err = user_error(exc)
        if err is not None:
            print(f"fairseq_quant: error: {err}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook._fairseq_quant = True
    sys.excepthook = hook


def _length_sorted_indices(self):
    """Indices by number of frames (random order among equal lengths, from fairseq's per-epoch numpy
    seed), like fairseq's own audio datasets, so that batches hold utterances of similar length."""
    return np.lexsort((np.random.permutation(len(self)), np.asarray(self.frame_sizes)))


def sort_asr_batches_by_length() -> None:
    """Upstream ``AsrDataset.ordered_indices`` is ``arange``: batches mix lengths and pad to the longest
    (measured on the generated corpus at batch 8: about a third of the frames were padding)."""
    AsrDataset = importlib.import_module(f"{EXAMPLES_NAME}.speech_recognition.data.asr_dataset").AsrDataset
    AsrDataset.ordered_indices = _length_sorted_indices


FEATURE_CACHE_ENV = "FAIRSEQ_QUANT_FEATURE_CACHE_MB"


def cache_asr_features() -> None:
    """Memoise ``AsrDataset.__getitem__`` per dataset and index (features are deterministic: no dither).

    The cache is per process: with ``--num-workers 0`` (the CPU default) it lives for the whole training
    run; each data-loader worker would hold its own copy, so it is most useful without workers."""
    AsrDataset = importlib.import_module(f"{EXAMPLES_NAME}.speech_recognition.data.asr_dataset").AsrDataset
    if getattr(AsrDataset.__getitem__, "_fairseq_quant_cached", False):
        return
    uncached = AsrDataset.__getitem__

    def getitem(self, index):
        budget = float(os.environ.get(FEATURE_CACHE_ENV, "4096")) * 2 ** 20
        cache = self.__dict__.setdefault("_feature_cache", {})
        hit = cache.get(index)
        if hit is not None:
            return {"id": index, "data": [hit, self.tgt[index] if self.tgt is not None else None]}
        item = uncached(self, index)
        features = item["data"][0]
        used = self.__dict__.get("_feature_cache_bytes", 0)
        if used + features.numel() * features.element_size() <= budget:
            cache[index] = features
            self._feature_cache_bytes = used + features.numel() * features.element_size()
        return item

    getitem._fairseq_quant_cached = True
    AsrDataset.__getitem__ = getitem


def verify_checkpoint(path) -> None:
    """Check a torch checkpoint's zip members against their CRC-32s, which torch.load never checks: a
    truncated or bit-flipped file fails here with one line instead of deep inside torch or pickle, or of
    loading garbage weights. Files that are not zip archives (torch's legacy format) are left to torch.load."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as err:  # zipfile raises many kinds on a damaged archive
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({type(err).__name__}: {err})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupted checkpoint (CRC mismatch in {bad})")


def annotate_loaded_checkpoints() -> None:
    """Verify every checkpoint fairseq loads (trainer, ensembles, teachers), and tell a quant model which file
    its state comes from: every quant checkpoint fairseq loads (trainer,
    ensembles, teachers) gets ``path`` in its model state's ``_extra_state`` and, when written before the
    per-module specs were saved there, the strategy stored in its arguments. Inside the model state, they
    reach data-parallel workers that receive the state from rank 0."""
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_fairseq_quant", False):
        return

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        verify_checkpoint(path)
        try:
            with torch.serialization.safe_globals(checkpoint_globals()):
                state = original(path, arg_overrides, load_on_all_ranks)
        except pickle.UnpicklingError as err:
            raise CheckpointError(refusal(path, err)) from None
        except Exception as err:
            raise CheckpointError(f"{path}: cannot load checkpoint ({type(err).__name__}: {err})") from err
        model_state = state.get("model") if isinstance(state, dict) else None
        if isinstance(model_state, dict) and any("_quantizer." in k for k in model_state):
            extra = dict(model_state.get("_extra_state") or {})
            extra["path"] = str(path)
            if "quant_specs" not in extra:
                model_cfg = (state.get("cfg") or {}).get("model") or state.get("args")
                extra["quant_strategy"] = getattr(model_cfg, "quant_strategy_inline", None)
            model_state["_extra_state"] = extra
        return state

    load_checkpoint_to_cpu._fairseq_quant = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def broadcast_states_safely() -> None:
    """Data parallel: rank 0 loads a checkpoint (weights only, :func:`checkpoint_globals`) and fairseq broadcasts
    it by pickling it and ``torch.load``-ing the bytes on the other ranks, weights only since torch 2.6; the
    state holds the same argument and config classes, so the other ranks allow exactly those too."""
    from fairseq.distributed import utils as distributed_utils

    original = distributed_utils._broadcast_object_slow
    if getattr(original, "_fairseq_quant", False):
        return

    # fairseq sends the tensors apart and pickles a placeholder in their place
    allowed = checkpoint_globals() + [distributed_utils._TensorPlaceholder]

    def _broadcast_object_slow(*args, **kwargs):
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    _broadcast_object_slow._fairseq_quant = True
    distributed_utils._broadcast_object_slow = _broadcast_object_slow


def gather_lists_on_cpu() -> None:
    """fairseq's ``all_gather_list`` (syncing logging outputs across data-parallel workers) allocates CUDA
    buffers; without CUDA (gloo workers on CPU) gather the objects with torch.distributed instead."""
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    original = distributed_utils.all_gather_list
    if getattr(original, "_fairseq_quant", False):
        return

    def all_gather_list(data, group=None, max_size=16384):
        if torch.cuda.is_available():
            return original(data, group=group, max_size=max_size)
        group = group if group is not None else distributed_utils.get_global_group()
        gathered = [None] * distributed_utils.get_world_size(group=group)
        dist.all_gather_object(gathered, data, group=group)
        return gathered

    all_gather_list._fairseq_quant = True
    distributed_utils.all_gather_list = all_gather_list


def apply() -> None:
    """Apply every fix, then import the upstream speech_recognition example (registers its
    task ``speech_recognition``, models ``asr_vggtransformer*`` and criterion ``cross_entropy_acc``)."""
    allow_fairseq_checkpoints()
    install_excepthook()
    install_torchaudio_load_wav()
    expose_fairseq_examples()
    importlib.import_module(f"{EXAMPLES_NAME}.speech_recognition")
    sort_asr_batches_by_length()
    cache_asr_features()
    annotate_loaded_checkpoints()
    broadcast_states_safely()
    gather_lists_on_cpu()
