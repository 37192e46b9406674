"""quant_cross_entropy_acc: distillation, auxiliary CTC, logged quantization stats, and its errors."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, calibrate_tiny, fbank_batch

from fairseq_quant.criterions.quant_cross_entropy_acc import QuantCrossEntropyWithAccCriterion, TeacherError


def sample_for(task, seed=0):
    x, lengths, prev = fbank_batch(seed)
    target = torch.cat([prev[:, 1:], torch.full((prev.size(0), 1), task.target_dictionary.eos())], dim=1)
    target[2, -2:] = task.target_dictionary.pad()
    return {"net_input": {"src_tokens": x, "src_lengths": lengths, "prev_output_tokens": prev},
            "target": target, "ntokens": int((target != task.target_dictionary.pad()).sum())}


def test_distillation_from_an_identical_teacher_is_zero_and_matches_hand_computation(dict_dir):
    task, student, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    student.eval()  # no dropout: teacher and student outputs are deterministic
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, kd_weight=0.0)
    sample = sample_for(task)
    _, twin, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    twin.load_state_dict(student.state_dict())
    crit._teacher = (twin.eval(),)
    out = student(**sample["net_input"])
    assert crit.distillation_loss(student, out, sample, sample["target"]).item() == pytest.approx(0.0, abs=1e-5)

    torch.manual_seed(1)
    _, other, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    other.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    crit._teacher, crit.kd_temperature = (other.eval(),), 2.0
    kd = crit.distillation_loss(student, out, sample, sample["target"]).item()
    t_logits = other(**sample["net_input"])[0] / 2.0
    s_logits = out[0] / 2.0
    mask = (sample["target"] != task.target_dictionary.pad()).unsqueeze(-1)
    p_t = F.softmax(t_logits, -1)
    expected = ((p_t * (F.log_softmax(t_logits, -1) - F.log_softmax(s_logits, -1))) * mask).sum().item() * 4.0
    assert kd == pytest.approx(expected, rel=1e-4) and kd > 0


def test_layer_wise_distillation_is_zero_from_an_identical_teacher_and_matches_hand_computation(dict_dir):
    """--kd-hidden-weight: every transformer layer's output (4 in the tiny model: 2 encoder, 2 decoder) pulled
    towards the teacher's, layer-normalised, mean over layers, summed over valid encoder frames / target tokens."""
    from fairseq.modules import TransformerDecoderLayer, TransformerEncoderLayer

    task, student, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "2", "--quant-act-bits", "8"])
    calibrate_tiny(student, seeds=(0,))
    _, fp32, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    fp32.load_state_dict({k: v for k, v in student.state_dict().items() if k in fp32.state_dict()})
    with pytest.raises(TeacherError, match="--kd-hidden-weight > 0 needs --teacher-path"):
        QuantCrossEntropyWithAccCriterion(task, False, kd_hidden_weight=1.0)
    with pytest.raises(TeacherError, match="--kd-hidden-weight must be >= 0"):
        QuantCrossEntropyWithAccCriterion(task, False, kd_hidden_weight=-1.0)
    crit = QuantCrossEntropyWithAccCriterion(task, False, kd_weight=0.0)
    crit._teacher, crit.kd_hidden_weight = (fp32.eval(),), 2.0
    sample = sample_for(task)
    layers = sorted(n for n, m in fp32.named_modules() if isinstance(m, (TransformerEncoderLayer, TransformerDecoderLayer)))
    assert len(layers) == 4

    def training_step(model):  # a training step's loss without dropout or range updates: only the root trains
        model.eval()
        model.training = True
        return crit(model, sample)

    loss, _, log = training_step(student)  # the 2-bit student against its fp32 weights
    outs = {}
    for tag, model in (("s", student), ("t", fp32)):
        hooks = [m.register_forward_hook(lambda m, a, o, key=(tag, n): outs.__setitem__(key, o[0] if isinstance(o, tuple) else o))
                 for n, m in model.named_modules() if n in layers]
        with torch.no_grad():
            model(**sample["net_input"])
        for h in hooks:
            h.remove()
    src = sample["net_input"]
    enc_valid = ~student.encoder(src["src_tokens"], src["src_lengths"])["encoder_padding_mask"]  # T x B
    dec_valid = (sample["target"] != task.target_dictionary.pad()).t()
    expected = 0.0
    for n in layers:
        s, t = outs[("s", n)], outs[("t", n)]
        d = ((F.layer_norm(s, s.shape[-1:]) - F.layer_norm(t, t.shape[-1:])) ** 2).mean(-1)
        expected += (d * (enc_valid if n.startswith("encoder.") else dec_valid)).sum().item() / len(layers)
    assert log["kd_hidden_loss"] == pytest.approx(expected, rel=1e-4) and expected > 0.01
    assert loss.item() == pytest.approx(log["ce_loss"] + 2.0 * expected, rel=1e-4)
    _, _, log = training_step(fp32)  # the teacher against itself
    assert log["kd_hidden_loss"] == pytest.approx(0.0, abs=1e-6)
    assert "kd_hidden_loss" not in crit(fp32.eval(), sample)[2]  # validation: no teacher pass


def test_loss_mixes_ce_kd_and_ctc_and_logs_quant_stats(dict_dir):
    task, model, _ = build_tiny(dict_dir, extra=["--quant-weight-bits", "4", "--quant-act-bits", "8"])
    calibrate_tiny(model, seeds=(0,))
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, ctc_weight=0.3, ctc_encoder_dim=32)
    assert crit.ctc_proj.out_features == len(task.target_dictionary)
    model.train()
    loss, sample_size, log = crit(model, sample_for(task))
    assert set(log) >= {"ce_loss", "ctc_loss", "wbits", "model_mb"}
    assert log["wbits"] == 4.0 and 0 < log["model_mb"] < 0.1
    assert loss.item() == pytest.approx(log["ce_loss"] + 0.3 * log["ctc_loss"], rel=1e-5)
    loss.backward()
    assert crit.ctc_proj.weight.grad.abs().sum() > 0  # the CTC head is trained (fairseq optimizes criterion params)
    agg = QuantCrossEntropyWithAccCriterion.aggregate_logging_outputs([log])
    assert agg["ctc_loss"] == pytest.approx(log["ctc_loss"] / sample_size / math.log(2))


def test_teacher_errors_name_the_problem(dict_dir, tmp_path):
    task, _, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    with pytest.raises(TeacherError, match="teacher checkpoint not found: .*missing.pt"):
        QuantCrossEntropyWithAccCriterion(task, False, teacher_path=str(tmp_path / "missing.pt"), kd_weight=0.5)
    with pytest.raises(TeacherError, match="--kd-weight > 0 needs --teacher-path"):
        QuantCrossEntropyWithAccCriterion(task, False, kd_weight=0.5)
    with pytest.raises(TeacherError, match=r"--kd-weight must be in \[0, 1\], got 1.5"):
        QuantCrossEntropyWithAccCriterion(task, False, kd_weight=1.5)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(TeacherError, match="cannot load teacher checkpoint .*truncated.pt"):
        QuantCrossEntropyWithAccCriterion(task, False, teacher_path=str(truncated), kd_weight=0.5)


def smoke_task_and_teacher(smoke):
    from fairseq import checkpoint_utils

    work, _ = smoke
    fp32 = work / "fp32" / "checkpoint_best.pt"
    _, _, task = checkpoint_utils.load_model_ensemble_and_task([str(fp32)], arg_overrides={"data": str(work / "data")})
    return task, fp32


def test_teacher_without_kd_weight_distils_with_the_default_weight(smoke, caplog):
    task, fp32 = smoke_task_and_teacher(smoke)
    with caplog.at_level(logging.INFO):
        crit = QuantCrossEntropyWithAccCriterion(task, False, teacher_path=str(fp32))
    assert crit.kd_weight == 0.5 and crit.teacher is not None
    assert f"--teacher-path {fp32} without --kd-weight: distilling with --kd-weight 0.5" in caplog.text


def test_teacher_with_kd_weight_zero_warns_that_it_is_unused(smoke, caplog):
    task, fp32 = smoke_task_and_teacher(smoke)
    with caplog.at_level(logging.WARNING):
        crit = QuantCrossEntropyWithAccCriterion(task, False, teacher_path=str(fp32), kd_weight=0.0)
    assert crit.teacher is None
    assert [r.levelname for r in caplog.records if "--kd-weight 0" in r.getMessage()] == ["WARNING"]
    assert f"--teacher-path {fp32} is not used: --kd-weight 0 disables distillation" in caplog.text
