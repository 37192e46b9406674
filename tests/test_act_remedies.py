"""The activation remedies: the per-site report finds outlier channels (and that they repeat across sites), and a
16-bit activation rule keeps an outlier site's resolution; 16 bits are for activations only."""
import math

import pytest
import torch
from torch import nn

from fairseq_quant.quant import QuantSpec, Strategy, StrategyError, calibrate, quantize_model
from fairseq_quant.quant.act_report import collect_site_stats, format_site_table, repeated_outliers
from fairseq_quant.quant.quantizers import ActivationQuantizer, check_bits


class Residual(nn.Module):
    """Two linear layers reading a 16-wide stream whose channel 5 is 100x larger than the rest (a residual outlier
    dimension), then a projection reading the same stream."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = x.clone()
        x[..., 5] = x[..., 5] * 100.0
        return self.out(x + self.a(x) * 0.0) + self.b(x).sum() * 0.0


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 10, 16, generator=g) for _ in range(3)]


def test_report_names_the_outlier_channel_and_its_repetition():
    model = Residual()
    quantize_model(model, Strategy.uniform("fp32", 8))
    stats = {s.name: s for s in collect_site_stats(model, batches(), bits=8)}
    assert list(stats) == ["a.input_quantizer", "b.input_quantizer", "out.input_quantizer"]
    for s in stats.values():
        assert s.channels == 16 and s.outlier_channels == [5]
        assert s.peak_ratio == pytest.approx(max(abs(s.lo), abs(s.hi)) / s.p9999)
        # a per-tensor 8-bit grid over the outlier's range leaves the other 15 channels about 3 levels
        assert s.sqnr_db < 40
    assert repeated_outliers(list(stats.values())) == {16: {5: list(stats)}}
    table = format_site_table(list(stats.values()))
    assert table.splitlines()[0].endswith("| SQNR dB at 8 bits |") and "| a.input_quantizer | 16 |" in table
    assert all(not q.observing for q in model.modules() if isinstance(q, ActivationQuantizer))  # restored


def test_sixteen_bit_rule_keeps_the_outlier_site_resolution():
    torch.manual_seed(0)
    eight, sixteen = Residual(), Residual()
    sixteen.load_state_dict(eight.state_dict())
    quantize_model(eight, Strategy.uniform(8, 8))
    quantize_model(sixteen, Strategy.from_dict({"default": {"weight_bits": 8, "act_bits": 8},
                                                "rules": [{"match": "out", "act_bits": 16}]}))
    assert sixteen.out.input_quantizer.bits == 16 and sixteen.a.input_quantizer.bits == 8
    for m in (eight, sixteen):
        m.eval()
        calibrate(m, batches())
    x = batches()[0].clone()
    x[..., 5] *= 100.0
    exact = x[..., [i for i in range(16) if i != 5]]

    def error(m):  # the non-outlier channels of the out projection's quantized input
        q = m.out.input_quantizer(x)[..., [i for i in range(16) if i != 5]]
        return float((q - exact).pow(2).mean() / exact.pow(2).mean())

    # relative noise = step^2 / 12 over the unit-variance channels: about 0.4 at 8 bits (a step of about 3 over the
    # outlier's +-400), (255 / 65535)^2 = 1/66,000 of that at 16 bits
    assert 0.3 < error(eight) < 0.5 and error(sixteen) < 2e-5 and error(eight) / error(sixteen) > 3e4
    # the 16-bit grid: 65,536 levels over the calibrated range
    grid = sixteen.out.input_quantizer.last_grid
    assert grid.bits == 16 and grid.qmax - grid.qmin == 65535
    assert math.isclose(float(grid.scale), (float(sixteen.out.input_quantizer.hi)
                                            - float(sixteen.out.input_quantizer.lo)) / 65535, rel_tol=1e-6)


def test_sixteen_bits_are_for_activations_only():
    assert check_bits(16, "x", activation=True) == 16
    assert QuantSpec(weight_bits=8, act_bits=16).label() == "w8a16"
    with pytest.raises(ValueError, match=r"weight_bits must be an integer in 1..8 or fp32, got 16"):
        QuantSpec(weight_bits=16)
    with pytest.raises(ValueError, match=r"act_bits must be an integer in 1..8, 16 or fp32, got 12"):
        QuantSpec(act_bits=12)
    with pytest.raises(StrategyError, match=r"rule 1 \('out'\): act_bits must be an integer in 1..8, 16 or fp32"):
        Strategy.from_dict({"default": {"weight_bits": 8}, "rules": [{"match": "out", "act_bits": 32.5}]})


def test_report_refuses_a_model_without_estimated_sites():
    model = Residual()
    quantize_model(model, Strategy.uniform(8, "fp32"))
    with pytest.raises(ValueError, match="no activation quantizer with an estimated range"):
        collect_site_stats(model, batches())


def peg_strategy(groups=4, bits=4):
    return Strategy.from_dict({"default": {"weight_bits": 8, "act_bits": bits},
                               "rules": [{"match": "out", "act_granularity": "peg", "act_groups": groups}]})


def test_peg_puts_the_outlier_channel_in_a_group_of_its_own_range():
    """Per-embedding-group ranges: calibration sorts the channels by range and cuts them into equal groups, so the
    outlier channel shares one group's range with the 3 widest others and the 12 ordinary channels keep fine grids."""
    torch.manual_seed(0)
    tensor, peg = Residual(), Residual()
    peg.load_state_dict(tensor.state_dict())
    quantize_model(tensor, Strategy.uniform(8, 4))
    quantize_model(peg, peg_strategy())
    q = peg.out.input_quantizer
    assert (q.granularity, q.groups, q.width, q.range_count) == ("peg", 4, 16, 4)
    assert peg.a.input_quantizer.granularity == "tensor"
    for m in (tensor, peg):
        m.eval()
        calibrate(m, batches())
    assert q.lo.shape == q.hi.shape == (4,)
    assert sorted(torch.bincount(q.group_of, minlength=4).tolist()) == [4, 4, 4, 4]
    assert int(q.group_of[5]) == 3  # the widest group (groups are in order of range)
    assert float(q.hi[3]) > 50 * float(q.hi[:3].max())
    x = batches()[0].clone()
    x[..., 5] *= 100.0
    out = q(x)
    assert int(q.last_grid.off_grid(out).sum()) == 0
    for c in range(16):  # a 4-bit grid per channel, at most 16 values each
        assert out[..., c].unique().numel() <= 16
    ordinary = [c for c in range(16) if int(q.group_of[c]) < 3]
    exact = x[..., ordinary]

    def error(m):
        y = m.out.input_quantizer(x)[..., ordinary]
        return float((y - exact).pow(2).mean() / exact.pow(2).mean())

    # per tensor at 4 bits the step is about 50 (the outlier's +-400 over 15 steps): the ordinary channels round to
    # 0 (relative error about 1); per group their step is about 0.6 (relative error about 0.03)
    assert error(tensor) > 0.9 and error(peg) < 0.06


def test_peg_ranges_follow_training_batches_per_group():
    torch.manual_seed(0)
    model = Residual()
    quantize_model(model, peg_strategy(bits=8))
    model.eval()
    calibrate(model, batches())
    q = model.out.input_quantizer
    q.momentum = 0.5
    before_lo, before_hi = q.lo.clone(), q.hi.clone()
    model.train()
    x = batches()[1].clone()
    x[..., 5] = 1000.0  # only the outlier channel's group sees a wider batch range
    with torch.no_grad():
        q(x)
    assert float(q.hi[3]) == pytest.approx(0.5 * float(before_hi[3]) + 0.5 * 1000.0)
    batch_hi = x.amax(dim=(0, 1))
    for g in range(3):  # the other groups move halfway to this batch's own group maximum
        expected = 0.5 * float(before_hi[g]) + 0.5 * float(batch_hi[q.group_of == g].max().clamp(min=0))
        assert float(q.hi[g]) == pytest.approx(expected, rel=1e-6)
    assert q.lo.shape == before_lo.shape


def test_peg_with_deferred_updates_reduces_every_group_over_workers():
    """Data parallel: each worker's pending group ranges are reduced elementwise, so both keep the same groups' grid."""
    from fairseq_quant.quant import apply_range_updates

    workers = []
    for seed in (0, 1):
        torch.manual_seed(0)
        m = Residual()
        quantize_model(m, peg_strategy(bits=8))
        m.eval()
        calibrate(m, batches())
        m.out.input_quantizer.momentum = 1.0
        m.out.input_quantizer.defer_range_updates = True
        m.train()
        with torch.no_grad():
            m.out.input_quantizer(batches()[seed] * (1 + seed))
        workers.append(m)
    local = [(m.out.input_quantizer.pending_range[0].clone(), m.out.input_quantizer.pending_range[1].clone())
             for m in workers]
    for i, m in enumerate(workers):
        other = torch.cat([-local[1 - i][0], local[1 - i][1]])

        def reduce_max(t, other=other):
            # all_reduce(MAX) over [-lo, hi] per quantizer in model order; only the last (out: 4 + 4 values) ran
            return torch.maximum(t, torch.cat([t[: t.numel() - 8], other]))

        apply_range_updates(m, reduce_max=reduce_max)
    a, b = workers[0].out.input_quantizer, workers[1].out.input_quantizer
    assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
    assert torch.equal(a.hi, torch.maximum(local[0][1], local[1][1]))
    assert torch.equal(a.lo, torch.minimum(local[0][0], local[1][0]))


def test_token_ranges_come_from_each_token():
    q = ActivationQuantizer(bits=4, granularity="token", width=16)
    assert bool(q.initialized) and q.range_count == 0  # nothing to calibrate
    q.start_calibration()
    assert not q.observing
    x = batches()[0]
    out = q(x)
    for row, qrow in zip(x.reshape(-1, 16), out.reshape(-1, 16)):
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        step = (hi - lo) / 15
        assert qrow.unique().numel() <= 16
        assert float((qrow - row).abs().max()) <= step / 2 + 1e-5
    louder = x.clone()
    louder[0, 0] *= 100.0  # one token 100x louder: only its own grid changes
    changed = q(louder)
    assert torch.equal(changed[0, 1:], out[0, 1:]) and torch.equal(changed[1:], out[1:])
    assert int(q.last_grid.off_grid(changed).sum()) == 0


def test_activation_granularity_errors_name_the_problem():
    with pytest.raises(StrategyError, match=r"3 activation groups do not divide the 16 channels of its input"):
        quantize_model(Residual(), peg_strategy(groups=3))
    with pytest.raises(StrategyError, match=r"default: act_granularity peg needs act_groups"):
        Strategy.from_dict({"default": {"act_granularity": "peg"}})
    with pytest.raises(StrategyError, match=r"rule 1 \('out'\): act_groups \(4\) applies to act_granularity peg"):
        Strategy.from_dict({"rules": [{"match": "out", "act_groups": 4}]})
    with pytest.raises(StrategyError, match=r"act_granularity token uses min-max ranges .*not 'percentile'"):
        Strategy.from_dict({"default": {"act_granularity": "token", "act_method": "percentile"}})
    with pytest.raises(StrategyError, match=r"unknown act_granularity 'channel'"):
        Strategy.from_dict({"default": {"act_granularity": "channel"}})
    with pytest.raises(StrategyError, match=r"act_groups, a positive number of channel groups, got 0"):
        Strategy.from_dict({"default": {"act_granularity": "peg", "act_groups": 0}})
    with pytest.raises(ValueError, match=r"conv.input: per-token ranges over its single input channel would keep"):
        ActivationQuantizer(bits=8, granularity="token", width=1, channel_dim=1, name="conv.input")
    assert QuantSpec(act_bits=6, act_granularity="peg", act_groups=8).label() == "w8a6-peg8"
    assert QuantSpec(act_bits=4, act_granularity="token").label() == "w8a4-token"


def test_size_report_counts_one_range_per_group_and_none_per_token():
    sizes = {}
    for name, strategy in (("tensor", Strategy.uniform(8, 8)), ("peg", peg_strategy(bits=8)),
                           ("token", Strategy.uniform(8, 8, act_granularity="token"))):
        sizes[name] = quantize_model(Residual(), strategy).quant_mb * 1e6
    # 3 sites with one (scale, zero point) pair each; peg: the out site holds 4; token: none at all
    assert sizes["peg"] - sizes["tensor"] == pytest.approx(3 * 8)
    assert sizes["tensor"] - sizes["token"] == pytest.approx(3 * 8)
