"""The recipe's memory estimate against what autograd really keeps: a forward of small fp32 and QAT
VGGTransformers built by fairseq, counted with saved-tensor hooks; parameter counts exactly."""
import pytest
import torch
from conftest import VOCAB, build_tiny, calibrate_tiny

from recipes.librispeech.memory import activation_floats, arch_config, arch_from_args, batch_memory, parameters

TINY = ["--vggblock-enc-config", "[(8, 3, 2, 2, True)]", "--transformer-enc-config",
        "((32, 2, 64, True, 0.1, 0.1, 0.1),) * 2", "--enc-output-dim", "32", "--tgt-embed-dim", "32",
        "--conv-dec-config", "((32, 3, True),) * 2", "--transformer-dec-config",
        "((32, 2, 64, True, 0.1, 0.1, 0.1),) * 2", "--input-feat-per-channel", "80"]
# the shape of vggtransformer_small (two one-conv VGG blocks) and of the paper's model (attention over long
# utterances), at sizes a CPU test can run
SMALL = ["--vggblock-enc-config", "[(8, 3, 2, 1, True), (16, 3, 2, 1, True)]", "--transformer-enc-config",
         "((48, 4, 96, True, 0.1, 0.1, 0.1),) * 3", "--enc-output-dim", "48", "--tgt-embed-dim", "24",
         "--conv-dec-config", "((40, 3, True),) * 2", "--transformer-dec-config",
         "((48, 4, 96, True, 0.1, 0.1, 0.1),) * 2", "--input-feat-per-channel", "80"]


def saved_floats(model, utterances, frames, tokens):
    """Floats in the tensors autograd saves for backward during one training forward and loss (not weights)."""
    x = torch.randn(utterances, frames, 80)
    lengths = torch.full((utterances,), frames)
    prev = torch.randint(4, VOCAB + 4, (utterances, tokens))
    if hasattr(model, "quant_calibrated"):
        calibrate_tiny(model, seeds=(0,))  # the calibration phase of the quant model
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = model(x, lengths, prev)
        torch.log_softmax(out, dim=-1)
    return total / 4


@pytest.mark.parametrize("qat", [False, True])
@pytest.mark.parametrize("config,utterances,frames,tokens", [
    (TINY, 2, 400, 20), (SMALL, 3, 320, 15), (SMALL, 1, 960, 30)])
def test_activation_estimate_within_five_percent_of_autograd(dict_dir, config, utterances, frames, tokens, qat):
    torch.manual_seed(0)
    extra = [*config, "--quant-weight-bits", "4", "--quant-act-bits", "8"] if qat \
        else config
    _, model, args = build_tiny(dict_dir, arch="quant_vggtransformer_small" if qat else "vggtransformer_small",
                                extra=extra)
    measured = saved_floats(model, utterances, frames, tokens)
    estimate = activation_floats(arch_from_args(args), VOCAB + 4, utterances, frames, tokens, qat)
    assert estimate == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("config", [TINY, SMALL])
def test_parameter_count_is_exact(dict_dir, config):
    _, model, args = build_tiny(dict_dir, arch="vggtransformer_small", extra=config)
    assert parameters(arch_from_args(args), VOCAB + 4) == sum(p.numel() for p in model.parameters())


def test_paper_model_size_and_worst_batch():
    arch = arch_config("vggtransformer_2")
    assert round(parameters(arch, 5000) / 1e6) == 315  # PLATFORM.md: about 315 M
    m = batch_memory(arch, 5000, max_tokens=20000, longest_frames=3500, tokens_per_frame=0.05, qat=True, distill=True)
    assert (m.utterances, m.frames, m.tokens) == (5, 3500, 175)
    assert m.model_state_gb == pytest.approx(parameters(arch, 5000) * 20 / 1e9)
