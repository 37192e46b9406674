"""Multi-precision co-training: one set of latent weights at several precisions (fairseq_quant.quant.coprecision),
the criterion's co-training passes, and the convert phase that collapses a co-trained model to one allocation."""
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import build_tiny, calibrate_tiny
from test_criterion import sample_for

from fairseq_quant.criterions.quant_cross_entropy_acc import QuantCrossEntropyWithAccCriterion, TeacherError
from fairseq_quant.quant.coprecision import co_precisions, collapse, sample_allocation, weight_precision, \
    weight_quantizers
from fairseq_quant.quant.spec import QuantSpec, SpecError
from fairseq_quant.quant.strategy import StrategyError

CO = ["--quant-weight-bits", "8", "--quant-act-bits", "8", "--quant-co-weight-bits", "4,2,1"]


@pytest.fixture
def co_model(dict_dir):
    task, model, _ = build_tiny(dict_dir, extra=CO)
    calibrate_tiny(model, seeds=(0,))
    model.eval()
    return task, model


@pytest.mark.parametrize("method", ["lsq", "balanced"])
def test_every_precision_of_the_shared_weights_is_on_its_own_grid(dict_dir, method):
    task, model, _ = build_tiny(dict_dir, extra=[*CO, "--quant-weight-method", method])
    calibrate_tiny(model, seeds=(0,))
    model.eval()
    assert co_precisions(model) == [4, 2, 1]
    sample = sample_for(task)
    outputs = {}
    for bits in (8, 4, 2, 1):
        with weight_precision(model, bits), torch.no_grad():
            outputs[bits] = model(**sample["net_input"])[0]
            for name, q in weight_quantizers(model).items():
                module = model.get_submodule(name)
                w = q(module.weight_layout())
                assert q.last_grid.bits == bits, name
                groups = q.granularity.group_view(w)
                assert not q.last_grid.off_grid(groups).any(), name
                assert max(len(torch.unique(row)) for row in groups) <= 2 ** bits, name
                if bits > 1:  # balanced grids: no level at zero, as many levels above it as below
                    levels = (q.last_grid.offset / q.last_grid.scale).reshape(-1)
                    expected = -(2 ** bits - 1) / 2 if method == "balanced" else 0.0
                    assert torch.allclose(levels, torch.full_like(levels, expected)), name
    assert all(q.active_bits == 8 for q in weight_quantizers(model).values())  # restored on exit
    from conftest import fbank_batch

    from fairseq_quant.quant.audit import audit

    for bits in (2, 1):  # the operand audit at each precision: every weight on a grid of at most that many bits
        with weight_precision(model, bits), torch.no_grad():
            report = audit(model, lambda: model(*fbank_batch(0)), bits, 8)
        assert report.violations == [] and report.op_counts()["linear"] > 10
    for low in (4, 2, 1):  # lower precisions compute other functions of the same weights
        assert (outputs[low] - outputs[8]).abs().max() > 1e-3
    # under lsq (and balanced) every multi-bit precision learns its own step; 1 bit is binary (mean |w|), with none
    names = {k.rsplit(".", 1)[-1] for k in model.state_dict() if ".weight_quantizer." in k}
    assert {"step", "step_w4", "step_w2", "initialized_w4", "initialized_w2"} <= names
    assert not any(k.endswith("step_w1") for k in model.state_dict())


def test_a_two_precision_step_is_the_sum_of_the_single_precision_losses(co_model):
    task, model = co_model
    sample = sample_for(task)
    plain = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False)
    own = plain(model, sample)[0]
    with weight_precision(model, 2):
        at2 = plain(model, sample)[0]
    co = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, co_precisions="2")
    loss, _, log = co(model, sample)
    assert loss.item() == pytest.approx(own.item() + at2.item(), rel=1e-6)
    assert log["loss"] == pytest.approx(loss.item()) and log["loss_w2"] == pytest.approx(at2.item(), rel=1e-6)
    # in-place distillation adds KL(own || 2-bit) of the decoder outputs over the target tokens
    kd = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, co_precisions="2", co_kd_weight=0.5)
    loss_kd, _, log_kd = kd(model, sample)
    with torch.no_grad():
        p_own = model(**sample["net_input"])[0]
        with weight_precision(model, 2):
            p_low = model(**sample["net_input"])[0]
    mask = (sample["target"] != task.target_dictionary.pad()).unsqueeze(-1)
    kl = (F.softmax(p_own, -1) * (F.log_softmax(p_own, -1) - F.log_softmax(p_low, -1)) * mask).sum().item()
    assert log_kd["cokd_w2"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert loss_kd.item() == pytest.approx(own.item() + at2.item() + 0.5 * kl, rel=1e-5)


def test_each_precision_trains_its_own_step_and_the_shared_weights(co_model):
    task, model = co_model
    model.train()
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, co_precisions="4,2,1")
    loss, _, log = crit(model, sample_for(task))
    assert set(log) >= {"loss_w4", "loss_w2", "loss_w1"}
    loss.backward()
    fc = model.get_submodule(next(iter(weight_quantizers(model))))
    q = fc.weight_quantizer
    assert all(getattr(q, p).grad.abs().sum() > 0 for p in ("step", "step_w4", "step_w2"))
    assert fc.weight.grad.abs().sum() > 0


def test_the_schedule_adds_precisions_as_updates_pass_and_stochastic_draws_follow_the_seed(co_model):
    task, model = co_model
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, co_precisions="4,2,1",
                                             co_schedule="2:10,1:20")
    for update, active in ((0, [4]), (9, [4]), (10, [4, 2]), (25, [4, 2, 1])):
        model.set_num_updates(update)
        assert crit.active_co_precisions(model) == active
    torch.manual_seed(3)
    first = sample_allocation(model)
    torch.manual_seed(3)
    assert sample_allocation(model) == first and set(first.values()) <= {8, 4, 2, 1}
    assert len(set(first.values())) > 1  # a mix, one precision per module
    assert set(sample_allocation(model, allowed={4}).values()) <= {8, 4}
    model.train()
    stochastic = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, co_precisions="2", co_stochastic=True)
    assert "loss_wmix" in stochastic(model, sample_for(task))[2]


def test_bad_co_training_settings_name_the_problem(dict_dir, co_model):
    task, model = co_model
    with pytest.raises(TeacherError, match=r"--co-precisions '4,x': expected comma-separated precisions"):
        QuantCrossEntropyWithAccCriterion(task, False, co_precisions="4,x")
    with pytest.raises(TeacherError, match=r"--co-precisions '9': precisions are distinct integers in 1..8"):
        QuantCrossEntropyWithAccCriterion(task, False, co_precisions="9")
    with pytest.raises(TeacherError, match=r"--co-schedule '3:10': 3 is not in --co-precisions \[2\]"):
        QuantCrossEntropyWithAccCriterion(task, False, co_precisions="2", co_schedule="3:10")
    with pytest.raises(TeacherError, match="--co-kd-weight and --co-stochastic apply to co-training"):
        QuantCrossEntropyWithAccCriterion(task, False, co_kd_weight=1.0)
    with pytest.raises(TeacherError, match=r"--co-precisions \[3\] are not co-trained precisions of the model"):
        QuantCrossEntropyWithAccCriterion(task, False, co_precisions="3")(model, sample_for(task))
    with pytest.raises(StrategyError, match=r"--quant-co-weight-bits 8,4: co_weight_bits \[8, 4\] are precisions "
                                            r"besides weight_bits \(8\)"):
        build_tiny(dict_dir, extra=["--quant-weight-bits", "8", "--quant-co-weight-bits", "8,4"])
    with pytest.raises(SpecError, match="co-training starts from a multi-bit weight_bits"):
        QuantSpec(weight_bits=1, co_weight_bits=[2])
    with pytest.raises(ValueError, match=r"precision 3 is not one of its co-trained precisions \(8, 4, 2, 1\)"):
        with weight_precision(model, {next(iter(weight_quantizers(model))): 3}):
            pass


def test_collapse_gives_an_ordinary_model_that_computes_the_co_trained_allocation(dict_dir, co_model, tmp_path):
    """The convert phase: the co-trained model at a per-module allocation and the ordinary quantized model that
    collapse() makes of it compute the same outputs, and the latter stores no co-training state."""
    task, model = co_model
    sample = sample_for(task)
    names = list(weight_quantizers(model))
    allocation = {name: (8, 4, 2, 1)[i % 4] for i, name in enumerate(names)}
    with torch.no_grad():
        for bits in (4, 2):  # initialise every precision's step, then move it from its initial value
            with weight_precision(model, bits):
                model(**sample["net_input"])
        for key, value in model.state_dict().items():
            if ".step" in key:
                value.mul_(1.1)
        with weight_precision(model, allocation):
            expected = model(**sample["net_input"])[0]
    state, specs = collapse(model.state_dict(), model.quant_specs, allocation)
    assert not any("_w" in k.rsplit(".", 1)[-1] for k in state if ".weight_quantizer." in k)
    assert all(specs[n].weight_bits == b and specs[n].co_weight_bits is None for n, b in allocation.items())
    assert all(specs[n].weight_method == "binary" for n, b in allocation.items() if b == 1)
    rules = [{"match": name, **spec.to_dict()} for name, spec in specs.items()]
    for rule in rules:
        for k in ("weight_bits", "act_bits"):
            rule[k] = "fp32" if rule[k] is None else rule[k]
    strategy = tmp_path / "collapsed.yaml"
    strategy.write_text(yaml.safe_dump({"default": {"weight_bits": 8, "act_bits": 8}, "rules": rules}))
    _, plain, _ = build_tiny(dict_dir, extra=["--quant-strategy", str(strategy)])
    plain.load_state_dict(state)
    plain.eval()
    with torch.no_grad():
        got = plain(**sample["net_input"])[0]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    with pytest.raises(KeyError, match="no co-trained module named"):
        collapse(model.state_dict(), model.quant_specs, {"encoder.nothing": 2})


def test_the_teacher_runs_once_per_batch_for_every_precision(dict_dir, co_model):
    """Distillation from fp32 in every pass uses one teacher forward per batch (cached within the call only)."""
    task, model = co_model
    _, teacher, _ = build_tiny(dict_dir, arch="vggtransformer_small")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    crit = QuantCrossEntropyWithAccCriterion(task, sentence_avg=False, co_precisions="4,2")
    crit._teacher, crit.kd_weight = (teacher.eval(),), 0.5  # as --teacher-path would set them
    model.train()
    _, _, log = crit(model, sample_for(task))
    assert len(calls) == 1 and log["kd_loss"] > 0 and set(log) >= {"loss_w4", "loss_w2"}
    crit(model, sample_for(task, seed=1))
    assert len(calls) == 2  # a new batch: the teacher runs again
