"""The CTC head and joint CTC/attention decoding: exact prefix scores, the model's own quantized head trained by
the criterion, fairseq's beam search scoring the weighted sum of both models, and the runtime's beam search
returning fairseq's hypotheses."""
import itertools
import math
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator

from conftest import build_tiny, calibrate_tiny, fbank_batch
from fairseq_quant.criterions.quant_cross_entropy_acc import QuantCrossEntropyWithAccCriterion, TeacherError
from fairseq_quant.evaluate import JointCTCModel
from fairseq_quant_runtime.ctc import CTCPrefixScorer

BLANK, EOS = 1, 2


def collapse(path):
    out, prev = [], None
    for p in path:
        if p != prev and p != BLANK:
            out.append(p)
        prev = p
    return out


def brute_force(log_probs, length, prefix, whole=False):
    """log of the summed probability of every CTC path whose output starts with (whole: is) ``prefix``."""
    total = 0.0
    for path in itertools.product(range(log_probs.shape[1]), repeat=length):
        out = collapse(path)
        if (out == prefix if whole else out[: len(prefix)] == prefix) and not (whole and EOS in path):
            total += math.exp(sum(log_probs[t, p] for t, p in enumerate(path)))
    return math.log(total)


def test_prefix_scores_are_the_summed_probabilities_of_the_ctc_paths():
    """Every score equals a brute-force sum over all paths, for utterances of different lengths in one batch,
    a repeated token (which needs a blank between) and EOS (the whole sequence)."""
    rng = np.random.default_rng(0)
    lp = torch.log_softmax(torch.tensor(rng.standard_normal((2, 5, 4)), dtype=torch.float32), -1).numpy()
    lengths = np.array([5, 3])
    scorer = CTCPrefixScorer(lp, lengths, blank=BLANK, eos=EOS)
    state = scorer.initial_state()
    c1 = scorer.extend(state, 0, np.zeros(2, dtype=np.int64), np.array([[0, 3, EOS, BLANK]] * 2))
    state = CTCPrefixScorer.select(c1, np.array([0, 1]), np.array([3, 3]))
    c2 = scorer.extend(state, 1, np.array([3, 3]), np.array([[3, 0, EOS]] * 2))
    for n in range(2):
        expected1 = [brute_force(lp[n], lengths[n], [0]), brute_force(lp[n], lengths[n], [3]),
                     brute_force(lp[n], lengths[n], [], whole=True)]
        np.testing.assert_allclose(c1.scores[n, :3], expected1, rtol=1e-5)
        assert c1.scores[n, 3] < -1e29  # blank is never a token
        expected2 = [brute_force(lp[n], lengths[n], [3, 3]), brute_force(lp[n], lengths[n], [3, 0]),
                     brute_force(lp[n], lengths[n], [3], whole=True)]
        np.testing.assert_allclose(c2.scores[n], expected2, rtol=1e-5)
    with pytest.raises(ValueError, match="token 1 was not scored for row 1"):
        CTCPrefixScorer.select(c2, np.array([0, 1]), np.array([3, BLANK]))


def test_the_whole_sequence_score_is_torch_ctc_log_likelihood():
    rng = np.random.default_rng(1)
    lp = torch.log_softmax(torch.tensor(rng.standard_normal((1, 30, 8)), dtype=torch.float32), -1)
    target = [4, 4, 6, 3, 5]
    scorer = CTCPrefixScorer(lp.numpy(), np.array([30]), blank=BLANK, eos=EOS)
    state, last = scorer.initial_state(), np.zeros(1, dtype=np.int64)
    for i, token in enumerate(target):
        cands = scorer.extend(state, i, last, np.array([[token, EOS]]))
        state, last = CTCPrefixScorer.select(cands, np.array([0]), np.array([token])), np.array([token])
    final = scorer.extend(state, len(target), last, np.array([[EOS]])).scores[0, 0]
    expected = -F.ctc_loss(lp.transpose(0, 1), torch.tensor([target]), torch.tensor([30]), torch.tensor([5]),
                           blank=BLANK, reduction="sum")
    assert final == pytest.approx(expected.item(), rel=1e-5)


def test_bad_scorer_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r"must be \[rows, frames, vocab\]"):
        CTCPrefixScorer(np.zeros((3, 4)), np.array([4, 4, 4]), BLANK, EOS)
    with pytest.raises(ValueError, match=r"lengths must be 2 values in \[1, 4\]"):
        CTCPrefixScorer(np.zeros((2, 4, 5)), np.array([4, 5]), BLANK, EOS)


def test_the_ctc_arch_quantizes_its_head_and_the_criterion_trains_it(dict_dir):
    task, model, _ = build_tiny(dict_dir, arch="quant_vggtransformer_small_ctc",
                                extra=["--quant-weight-bits", "2", "--quant-act-bits", "8"])
    calibrate_tiny(model, seeds=(0,))
    assert type(model.ctc_proj).__name__ == "QuantLinear" and model.ctc_proj.out_features == len(task.target_dictionary)
    assert "ctc_proj" in model.quant_report.specs  # counted in the model's size, like every other layer
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, ctc_weight=0.3)
    assert not hasattr(crit, "ctc_proj")  # the model's head is trained, not a criterion head
    x, lengths, prev = fbank_batch(0)
    target = torch.cat([prev[:, 1:], torch.full((3, 1), task.target_dictionary.eos())], dim=1)
    sample = {"net_input": {"src_tokens": x, "src_lengths": lengths, "prev_output_tokens": prev},
              "target": target, "ntokens": target.numel(), "nsentences": 3}
    model.train()
    loss, _, log = crit(model, sample)
    assert log["ctc_loss"] > 0 and loss.item() == pytest.approx(log["ce_loss"] + 0.3 * log["ctc_loss"], rel=1e-5)
    loss.backward()
    assert model.ctc_proj.weight.grad.abs().sum() > 0
    _, plain, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    with pytest.raises(TeacherError, match="needs a model with a CTC head"):
        crit(plain, sample)


def test_a_checkpoint_without_the_head_loads_it_fresh_and_says_so(dict_dir, caplog):
    _, plain, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    _, model, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    fresh = model.ctc_proj.weight.detach().clone()
    model.load_state_dict(plain.state_dict())
    assert torch.equal(model.ctc_proj.weight, fresh)
    assert torch.equal(model.decoder.fc_out.weight, plain.decoder.fc_out.weight)
    assert "has no CTC head" in caplog.text


def teacher_forced(model, x, lengths, i, hyp):
    """(attention log-prob of the ``hyp`` tokens incl. EOS, CTC log-likelihood of ``hyp`` without EOS) of
    utterance ``i``, computed in the same padded batch as beam search (upstream's encoder output of an utterance
    depends slightly on the batch's padding)."""
    eos = model.decoder.dictionary.eos()
    tokens = torch.tensor(hyp)
    prev = torch.cat([torch.tensor([eos]), tokens[:-1]])[None].repeat(x.size(0), 1)
    with torch.no_grad():
        logits, extra = model(x, lengths, prev)
    att = torch.log_softmax(logits[i].float(), -1).gather(1, tokens[:, None]).sum().item()
    ctc_lp = torch.log_softmax(extra["ctc_logits"][:, i : i + 1].float(), -1)  # T x 1 x V
    frames = int((~extra["encoder_padding_mask"][:, i]).sum())
    ctc = -F.ctc_loss(ctc_lp[:frames], tokens[None, :-1], torch.tensor([frames]), torch.tensor([len(hyp) - 1]),
                      blank=model.decoder.dictionary.pad(), reduction="sum").item()
    return att, ctc


def test_joint_beam_search_scores_the_weighted_sum_of_attention_and_ctc(dict_dir):
    """fairseq's SequenceGenerator with JointCTCModel: each returned hypothesis scores exactly
    (1 - w) * attention log-prob + w * CTC log-likelihood (hypotheses finishing at different steps leave the
    batch: a misplaced CTC state would break the identity)."""
    torch.manual_seed(0)
    task, model, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    model.eval()
    x, lengths, _ = fbank_batch(3, frames=(120, 90, 60))
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0
    generator = SequenceGenerator(JointCTCModel(model, 0.4, pre_beam=4), task.target_dictionary, beam_size=3,
                                  max_len_a=0, max_len_b=6)
    with torch.no_grad():
        out = generator.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})
    for i, hypos in enumerate(out):
        assert len(hypos) == 3
        for h in hypos:
            hyp = h["tokens"].tolist()
            assert hyp[-1] == task.target_dictionary.eos()
            att, ctc = teacher_forced(model, x, lengths, i, hyp)
            assert h["positional_scores"].sum().item() == pytest.approx(0.6 * att + 0.4 * ctc, rel=1e-4, abs=1e-3)
            assert h["score"].item() == pytest.approx(h["positional_scores"].sum().item() / len(hyp), rel=1e-5)


def test_joint_weight_outside_its_range_is_refused(dict_dir):
    _, model, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\], got 1.5"):
        JointCTCModel(model, 1.5, pre_beam=4)


def test_averaging_makes_a_criterion_head_the_models_own(tmp_path):
    """A reference trained with the criterion's head (--ctc-encoder-dim) becomes a *_ctc model when averaged."""
    from recipes.librispeech.reference import average_checkpoints

    for name, value in (("checkpoint_1_1000.pt", 1.0), ("checkpoint_2_2000.pt", 3.0)):
        torch.save({"model": {"w": torch.full((2,), value)}, "optimizer_history": [{"num_updates": int(value * 1000)}],
                    "criterion": {"ctc_proj.weight": torch.full((3, 2), value), "ctc_proj.bias": torch.zeros(3)},
                    "cfg": {"model": Namespace(arch="vggtransformer_ref", _name="vggtransformer_ref")},
                    "extra_state": {}}, tmp_path / name)
    state = torch.load(average_checkpoints(tmp_path, 2, tmp_path / "model.pt"), map_location="cpu", weights_only=False)
    assert state["cfg"]["model"].arch == state["cfg"]["model"]._name == "vggtransformer_ref_ctc"
    assert state["model"]["ctc_proj.weight"].tolist() == [[2.0, 2.0]] * 3 and "criterion" not in state
    assert state["extra_state"]["ctc_head_from_criterion"] is True


def test_the_runtime_joint_beam_search_returns_fairseqs_hypotheses(dict_dir):
    """The exported model (fp32 kernels) decoded by the runtime's joint beam search: fairseq's tokens and scores,
    and without the CTC head's weight the attention decoder's own (the CTC output is in the encoder graph)."""
    from test_export import export

    from fairseq_quant_runtime.recognizer import Recognizer

    torch.manual_seed(0)
    task, model, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    model.eval()
    file, _, _ = export(task, model, float16=False)
    assert file.config["layout"]["ctc"] is True
    recognizer = Recognizer(file, "fp32", "fp32")
    x, lengths, _ = fbank_batch(3, frames=(120, 90, 60))
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0
    feats = [x[i, :n].numpy() for i, n in enumerate(lengths.tolist())]
    for weight, scored in ((0.4, JointCTCModel(model, 0.4, pre_beam=4)), (0.0, [model])):
        generator = SequenceGenerator(scored, task.target_dictionary, beam_size=3, max_len_a=0, max_len_b=6)
        with torch.no_grad():
            expected = generator.generate([model], {"net_input": {"src_tokens": x, "src_lengths": lengths}})
        got = recognizer.beam_search(feats, beam=3, max_len_a=0, max_len_b=6, ctc_weight=weight)
        assert [h.tokens for h in got] == [o[0]["tokens"].tolist()[:-1] for o in expected]
        np.testing.assert_allclose([h.score for h in got], [o[0]["score"].item() for o in expected], rtol=1e-4)
    with pytest.raises(ValueError, match=r"--beam 1 is greedy search .* needs --beam >= 2"):
        recognizer.transcribe_features(feats, beam=1, ctc_weight=0.5)


def test_the_twice_differentiable_ctc_loss_equals_torchs():
    """search.proxy.ctc_nll (the Hessian proxy's CTC term): torch's CTC loss and gradient, plus a second derivative
    that torch's own lacks; an empty target, a repeated label and shorter inputs included."""
    from fairseq_quant.search.proxy import ctc_nll

    torch.manual_seed(0)
    x = torch.randn(20, 3, 7, dtype=torch.float64, requires_grad=True)
    lp = x.log_softmax(-1)
    targets, inputs = torch.tensor([[3, 3, 4, 0], [5, 2, 0, 0], [2, 0, 0, 0]]), torch.tensor([20, 15, 9])
    for lengths in (torch.tensor([3, 2, 1]), torch.tensor([3, 2, 0])):
        ours = ctc_nll(lp, targets, inputs, lengths, blank=1)
        theirs = F.ctc_loss(lp, targets, inputs, lengths, blank=1, reduction="sum")
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
        g_ours, = torch.autograd.grad(ours, x, create_graph=True, retain_graph=True)
        g_theirs, = torch.autograd.grad(theirs, x, create_graph=True, retain_graph=True)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-12)
        hessian_row, = torch.autograd.grad(g_ours[0, 0, 3], x, retain_graph=True)
        assert torch.isfinite(hessian_row).all() and hessian_row.abs().sum() > 0
        with pytest.raises(RuntimeError, match="derivative for aten::_ctc_loss_backward is not implemented"):
            torch.autograd.grad(g_theirs[0, 0, 3], x)


def test_the_ctc_head_is_a_unit_of_the_search_and_a_group_of_the_sensitivity_table(dict_dir):
    from fairseq_quant.search.space import model_units
    from fairseq_quant.sensitivity import layer_groups

    _, model, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    groups = layer_groups(model)
    assert groups.index("ctc_proj") == groups.index("encoder.transformer_layers.3") + 1  # after the encoder
    assert [u.name for u in model_units(model)].count("ctc_proj") == 1
    _, plain, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    assert "ctc_proj" not in layer_groups(plain)


def test_ctc_distillation_is_zero_from_an_identical_teacher_and_matches_hand_computation(dict_dir):
    """--kd-ctc-weight: T^2 * KL(teacher || student) of the CTC posteriors, summed over the valid encoder frames."""
    task, student, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    student.eval()
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, kd_weight=0.0, kd_temperature=2.0)
    x, lengths, prev = fbank_batch(0)
    _, twin, _ = build_tiny(dict_dir, arch="vggtransformer_small_ctc")
    twin.load_state_dict(student.state_dict())
    out = student(x, lengths, prev)
    assert crit.ctc_distillation_loss(out, twin.eval()(x, lengths, prev)).item() == pytest.approx(0.0, abs=1e-4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn_like(p))
        teacher_out = twin(x, lengths, prev)
    got = crit.ctc_distillation_loss(out, teacher_out).item()
    s_lp = torch.log_softmax(out[1]["ctc_logits"] / 2.0, -1)
    t_lp = torch.log_softmax(teacher_out[1]["ctc_logits"] / 2.0, -1)
    valid = ~out[1]["encoder_padding_mask"]
    expected = ((t_lp.exp() * (t_lp - s_lp)).sum(-1) * valid).sum().item() * 4.0
    assert got == pytest.approx(expected, rel=1e-4) and got > 0
    _, plain, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    with pytest.raises(TeacherError, match="needs a CTC head in the student and the teacher"):
        crit.ctc_distillation_loss(plain.eval()(x, lengths, prev), teacher_out)
    with pytest.raises(TeacherError, match="--kd-ctc-weight > 0 needs --teacher-path"):
        QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, kd_ctc_weight=0.5)
