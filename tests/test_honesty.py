"""Honesty: every weight and activation operand of every linear / conv / matmul / embedding op is on a
quantization grid, in training and in incremental beam decoding; leaving any one module float is caught;
the quantized modules compute exactly what fairseq's modules compute when quantization is off."""
import functools
import math

import pytest
import torch
import yaml
from conftest import build_tiny, calibrate_tiny, fbank_batch
from fairseq.modules import LinearizedConvolution, MultiheadAttention
from fairseq.sequence_generator import SequenceGenerator

from fairseq_quant.quant import FP32, QuantConvTBC, QuantMultiheadAttention, calibrate, quantizable_names
from fairseq_quant.quant.audit import audit


def calibrated_model(dict_dir, extra):
    task, model, _ = build_tiny(dict_dir, extra=extra)
    calibrate_tiny(model, seeds=(0, 1))
    assert bool(model.quant_calibrated)
    return task, model


def train_forward(model):
    model.train()
    x, lengths, prev = fbank_batch(5)
    return model(x, lengths, prev)


def beam_decode(task, model):
    model.eval()
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=6, min_len=4)
    x, lengths, _ = fbank_batch(6)
    with torch.no_grad():
        return gen.forward({"net_input": {"src_tokens": x, "src_lengths": lengths}})


STRATEGIES = {
    "w4a8-channel": (["--quant-weight-bits", "4", "--quant-act-bits", "8"], 4, 8),
    "w2a8-lsq-channel": (["--quant-weight-bits", "2", "--quant-act-bits", "8"], 2, 8),
    "w3a4-minmax-pact": (["--quant-weight-bits", "3", "--quant-act-bits", "4", "--quant-weight-method", "minmax",
                          "--quant-act-method", "pact"], 3, 4),
    "w1a8-binary": (["--quant-weight-bits", "1", "--quant-act-bits", "8"], 1, 8),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_operand_is_quantized_in_training_and_beam_decoding(dict_dir, name):
    flags, wbits, abits = STRATEGIES[name]
    task, model = calibrated_model(dict_dir, flags)

    report = audit(model, lambda: train_forward(model), wbits, abits)
    assert report.violations == []
    counts = report.op_counts()
    # VGG convs, encoder/decoder linears, causal decoder convs, embedding, attention matmuls
    assert counts["conv2d"] == 2 and counts["conv_tbc"] == 2 and counts["embedding"] == 1
    assert counts["linear"] == 2 + 2 * (4 + 2) + 2 * (8 + 2) + 1  # adapters, enc layers, dec layers, fc_out
    assert counts["bmm"] == 2 * 2 + 2 * 2 * 2

    report = audit(model, lambda: beam_decode(task, model), wbits, abits)
    assert report.violations == []
    counts = report.op_counts()
    assert "conv_tbc" not in counts  # incremental decoding uses the linearized path ...
    conv_linear = [m for m, op in report.ops if op == "linear" and m.startswith("decoder.conv_layers")]
    assert len(conv_linear) >= 2 * 6  # ... of both decoder convolutions, at every step


def test_group_granularity_is_audited_per_group(dict_dir, tmp_path):
    strategy = {"default": {"weight_bits": 2, "act_bits": 8, "granularity": "group", "group_size": 16},
                "rules": [{"match": "encoder.conv_layers.*", "granularity": "channel"}]}
    path = tmp_path / "g16.yaml"
    path.write_text(yaml.safe_dump(strategy))
    task, model = calibrated_model(dict_dir, ["--quant-strategy", str(path)])
    report = audit(model, lambda: train_forward(model), 2, 8)
    assert report.violations == []
    # with groups of 16, a 32-wide row carries up to 2 * 4 distinct values: more than a per-row 2-bit grid
    fc1 = model.encoder.transformer_layers[1].fc1
    row = fc1.weight_quantizer(fc1.weight)[0]
    assert 4 < len(torch.unique(row)) <= 8


def top_level_quantizable(model):
    """Quantizable modules that a strategy can leave float (attention projections go with their attention)."""
    names = quantizable_names(model)
    return [n for n in names if not any(n.startswith(p + ".") for p in names if p != n)]


def leave_one_float(dict_dir, tmp_path, name, bits=4):
    strategy = {"default": {"weight_bits": bits, "act_bits": 8},
                "rules": [{"match": name, "weight_bits": "fp32", "act_bits": "fp32"}]}
    path = tmp_path / "leave_one.yaml"
    path.write_text(yaml.safe_dump(strategy))
    return calibrated_model(dict_dir, ["--quant-strategy", str(path)])


@functools.cache
def _names(dict_dir):
    _, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "4", "--quant-act-bits", "8"])
    return top_level_quantizable(model)


def test_module_inventory(dict_dir):
    names = _names(dict_dir)
    assert len(names) == 22
    assert "encoder.transformer_layers.1.self_attn" in names and "decoder.layers.0.encoder_attn" in names
    assert "decoder.conv_layers.3" in names and "decoder.embed_tokens" in names and "decoder.fc_out" in names


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("index", range(22))
def test_audit_catches_any_single_float_module(dict_dir, tmp_path, index, bits):
    """At 8 bits too: rows of a small model have fewer than 256 values, so counting distinct values cannot
    tell a float weight from an 8-bit one; membership on each quantizer's grid can."""
    name = _names(dict_dir)[index]
    task, model = leave_one_float(dict_dir, tmp_path, name, bits)
    report = audit(model, lambda: train_forward(model), bits, 8)
    culprits = {v.module for v in report.violations}
    assert culprits and all(m == name or m.startswith(name + ".") for m in culprits), report.violations
    if name.endswith("attn") and "encoder_attn" not in name:
        # float self-attention takes fairseq's fast path with the raw projection weights
        assert any(v.op == "multi_head_attention_forward" for v in report.violations)


def test_float_linearized_conv_is_caught_in_incremental_decoding(dict_dir, tmp_path):
    task, model = leave_one_float(dict_dir, tmp_path, "decoder.conv_layers.0")
    assert isinstance(model.decoder.conv_layers[0], LinearizedConvolution)
    report = audit(model, lambda: beam_decode(task, model), 4, 8)
    assert {v.module for v in report.violations} == {"decoder.conv_layers.0"}


# ---------- the quantized modules with quantization off are exactly fairseq's modules ----------

def fairseq_mha(kind):
    torch.manual_seed(0)
    if kind == "self":
        return MultiheadAttention(32, 4, dropout=0.0, self_attention=True)
    return MultiheadAttention(32, 4, kdim=32, vdim=32, dropout=0.0, encoder_decoder_attention=True)


def test_fp32_attention_matches_fairseq_fast_path():
    ref = fairseq_mha("self").eval()
    ours = QuantMultiheadAttention.from_float(ref, FP32, "attn").eval()
    x = torch.randn(9, 2, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    mask = torch.triu(torch.full((9, 9), float("-inf")), 1)
    expected, expected_w = ref(x, x, x, key_padding_mask=pad, attn_mask=mask)
    got, got_w = ours(x, x, x, key_padding_mask=pad, attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, expected_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["self", "encdec"])
def test_fp32_attention_matches_fairseq_incremental_path_with_reordering(kind):
    ref = fairseq_mha(kind).eval()
    ours = QuantMultiheadAttention.from_float(ref, FP32, "attn").eval()
    # 2 sentences x 2 beams, as SequenceGenerator lays them out: beams of a sentence share encoder states
    enc = torch.randn(7, 2, 32).repeat_interleave(2, dim=1)
    enc_pad = torch.zeros(4, 7, dtype=torch.bool)
    enc_pad[2:, 5:] = True
    states = ({}, {})
    order = torch.tensor([1, 1, 3, 2])  # beam reselection within each sentence
    for step in range(4):
        q = torch.randn(1, 4, 32)
        outs = []
        for module, state in zip((ref, ours), states):
            if kind == "self":
                out, _ = module(q, q, q, incremental_state=state)
            else:
                out, _ = module(q, enc, enc, key_padding_mask=enc_pad, incremental_state=state, static_kv=True)
            module.reorder_incremental_state(state, order)
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def linearized_conv():
    torch.manual_seed(0)
    conv = LinearizedConvolution(16, 24, 3, padding=2)
    return torch.nn.utils.weight_norm(conv, dim=2)


def test_fp32_linearized_conv_matches_fairseq_in_both_paths():
    ref = linearized_conv().eval()
    ours = QuantConvTBC.from_float(ref, FP32, "conv").eval()
    assert ours.weight_g is ref.weight_g and ours.weight_v is ref.weight_v
    x = torch.randn(6, 2, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    ref_state, our_state = {}, {}
    ref._linearized_weight = None
    for t in range(6):
        step = x[t:t + 1].transpose(0, 1)  # [batch, 1, channels]
        torch.testing.assert_close(ours(step, our_state), ref(step, ref_state), atol=1e-5, rtol=1e-5)
    # and the incremental path equals the full causal convolution at every step
    full = ours(x)
    state = {}
    steps = torch.cat([ours(x[t:t + 1].transpose(0, 1), state) for t in range(6)], dim=1)
    torch.testing.assert_close(steps.transpose(0, 1), full, atol=1e-5, rtol=1e-5)


def test_quantized_incremental_decoding_equals_full_forward(dict_dir):
    """No stale cache and the same quantized weights in both decoder paths (w4a8, eval).

    Run in float64: in float32 the two paths' matmuls differ by ~1e-7 (different GEMM shapes, and different
    kernels on another CPU), enough to move an activation across a rounding boundary now and then, which
    changes the output by a whole quantization step (this failed on CI, never here). In float64 a flip has
    negligible probability, so any difference is a real stale cache or a different weight."""
    torch.manual_seed(0)
    task, model = calibrated_model(dict_dir, ["--quant-weight-bits", "4", "--quant-act-bits", "8"])
    model.eval().double()
    x, lengths, prev = fbank_batch(9)
    x = x.double()
    with torch.no_grad():
        enc = model.encoder(x, lengths)
        full, _ = model.decoder(prev, enc)
        state = {}
        steps = [model.decoder(prev[:, : t + 1], enc, incremental_state=state)[0] for t in range(prev.size(1))]
    assert full.dtype == torch.float64
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-9, rtol=1e-9)
    assert math.isfinite(float(full.abs().sum()))


def test_encoder_only_quant_architecture_is_fully_quantized(dict_dir):
    task, model, _ = build_tiny(dict_dir, arch="quant_vggtransformer_enc_1", extra=[
        "--quant-weight-bits", "4", "--quant-act-bits", "8"])
    x, lengths, _ = fbank_batch(3)
    model.eval()
    calibrate(model, [(x, lengths)], forward=lambda m, b: m(*b))  # the calibration phase
    model.train()
    report = audit(model, lambda: model(x, lengths), 4, 8)
    assert report.violations == []
    assert report.op_counts()["conv2d"] == 2 and report.op_counts()["bmm"] == 2 * 2
    assert model.quant_report.unsupported == [] and model.quant_report.avg_weight_bits == 4.0


def test_audit_catches_float_weights_behind_an_8_bit_layer():
    """A layer whose weight quantizer is off while its input is quantized: its rows hold 64 float values,
    fewer than an 8-bit grid's 256 levels, so only grid membership can tell."""
    from fairseq_quant.quant import Strategy, calibrate, quantize_model
    from fairseq_quant.quant.quantizers import WeightQuantizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    quantize_model(model, Strategy.uniform(8, 8))
    batch = torch.randn(16, 64)
    calibrate(model, [batch])
    assert audit(model, lambda: model(batch), 8, 8).violations == []
    model[2].weight_quantizer = WeightQuantizer(bits=None)  # weight left float behind an 8-bit input
    report = audit(model, lambda: model(batch), 8, 8)
    assert [str(v) for v in report.violations] == ["2: linear weight is not quantized (no weight quantizer)"]
    # and a weight quantized to 8 bits where 4 were asked for is named too
    model[2].weight_quantizer = WeightQuantizer(bits=8, method="symmetric")
    report = audit(model, lambda: model(batch), 4, 8)
    assert [str(v) for v in report.violations] == [
        "0: linear weight is quantized to 8 bits, more than the 4 allowed",
        "2: linear weight is quantized to 8 bits, more than the 4 allowed"]
