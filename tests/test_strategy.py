"""Strategies: YAML rules, first-match-wins lookup, inheritance from the default, and precise errors."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fairseq_quant.quant import QuantLinear, QuantSpec, Strategy, StrategyError, quantize_model

ALLOWED = "weight_bits, act_bits, granularity, group_size, weight_method, act_method"


class Tiny(nn.Module):
    """Modules: encoder.layers.{0 .. layers - 1}.fc1/fc2 (Linear 32->32), decoder.out_proj (Linear 32->out_in)."""

    def __init__(self, out_in=32, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.fc1, layer.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)
            self.encoder.layers.append(layer)
        self.decoder = nn.Module()
        self.decoder.out_proj = nn.Linear(out_in, 10)


STRATEGY_YAML = r"""
description: test strategy
default: {weight_bits: 8, act_bits: 8, granularity: channel, weight_method: symmetric, act_method: percentile}
rules:
  - match: "encoder.layers.0.*"
    weight_bits: 2
    granularity: group
    group_size: 16
  - match: 're:encoder\.layers\.\d+\.fc1'
    weight_bits: 4
  - match: "encoder.*"
    act_bits: fp32
"""


def write(tmp_path, text, name="strategy.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_rules_first_match_wins_and_inherit_default(tmp_path):
    s = Strategy.from_yaml(write(tmp_path, STRATEGY_YAML))
    assert s.default == QuantSpec(8, 8, "channel", None, "symmetric", "percentile")
    assert len(s.rules) == 3
    # rule 1 and rule 2 both match; the first wins. Unset fields come from the default.
    assert s.lookup("encoder.layers.0.fc1") == (QuantSpec(2, 8, "group", 16, "symmetric", "percentile"), 0)
    assert s.lookup("encoder.layers.0.fc2") == (QuantSpec(2, 8, "group", 16, "symmetric", "percentile"), 0)
    # regex (full match) rule
    assert s.lookup("encoder.layers.1.fc1") == (QuantSpec(4, 8, "channel", None, "symmetric", "percentile"), 1)
    # fullmatch: 'fc10' is not 'fc1', falls through to the glob rule
    assert s.lookup("encoder.layers.1.fc10") == (QuantSpec(8, None, "channel", None, "symmetric", "percentile"), 2)
    assert s.lookup("encoder.layers.1.fc2")[1] == 2
    assert s.spec_for("encoder.layers.1.fc1") == QuantSpec(4, 8, "channel", None, "symmetric", "percentile")
    # unmatched -> default
    assert s.lookup("decoder.out_proj") == (s.default, None)
    assert s.spec_for("decoder.out_proj") is s.default
    assert "strategy.yaml" in s.source


def test_yaml_strategy_applied_to_model(tmp_path):
    model = Tiny()
    report = quantize_model(model, Strategy.from_yaml(write(tmp_path, STRATEGY_YAML)))
    rows = {e.name: (e.spec_label, e.rule) for e in report.layers}
    assert rows == {
        "encoder.layers.0.fc1": ("w2a8", "rule 1: encoder.layers.0.*"),
        "encoder.layers.0.fc2": ("w2a8", "rule 1: encoder.layers.0.*"),
        "encoder.layers.1.fc1": ("w4a8", r"rule 2: re:encoder\.layers\.\d+\.fc1"),
        "encoder.layers.1.fc2": ("w8afp32", "rule 3: encoder.*"),
        "decoder.out_proj": ("w8a8", "default"),
    }
    fc = model.encoder.layers[0].fc1
    assert isinstance(fc, QuantLinear)
    assert str(fc.weight_quantizer.granularity) == "group16" and fc.weight_quantizer.bits == 2
    assert fc.weight_quantizer.method == "symmetric" and fc.input_quantizer.method == "percentile"
    assert model.encoder.layers[1].fc2.input_quantizer.bits is None


def test_rule_inherits_changed_default(tmp_path):
    s = Strategy.from_dict({"default": {"weight_bits": 3, "weight_method": "minmax", "act_bits": "fp32"},
                            "rules": [{"match": "a", "act_bits": 6}]})
    assert s.rules[0].spec == QuantSpec(3, 6, "channel", None, "minmax", "minmax")
    # no default at all -> QuantSpec() defaults
    s = Strategy.from_dict({"rules": [{"match": "a", "weight_bits": 2}]})
    assert s.default == QuantSpec()
    assert s.rules[0].spec == QuantSpec(weight_bits=2)


def test_binary_default_with_higher_precision_rule():
    """Binary network with the first/last layers kept at 8 bits: the rule only sets weight_bits.

    The default's weight_method was never written by the user (QuantSpec forces 'binary' for 1 bit), so
    an 8-bit rule must not inherit 'binary' and be rejected; it should get the ordinary default method.
    """
    s = Strategy.from_dict({"default": {"weight_bits": 1, "act_bits": 8},
                            "rules": [{"match": "decoder.out_proj", "weight_bits": 8}]})
    assert s.default.weight_method == "binary"
    assert s.rules[0].spec.weight_bits == 8
    assert s.rules[0].spec.weight_method == QuantSpec().weight_method


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(StrategyError, match=r"nope\.yaml: strategy file not found"):
        Strategy.from_yaml(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "default: {weight_bits: 8\nrules: [\n")
    with pytest.raises(StrategyError, match="not valid YAML"):
        Strategy.from_yaml(path)


@pytest.mark.parametrize("text,kind", [("- match: a\n", "list"), ("42\n", "int"), ("", "NoneType")])
def test_top_level_not_mapping(tmp_path, text, kind):
    with pytest.raises(StrategyError, match=f"a strategy is a mapping with 'default' and 'rules', got {kind}"):
        Strategy.from_yaml(write(tmp_path, text))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(StrategyError, match=r"unknown top-level keys \['defaults'\]"):
        Strategy.from_yaml(write(tmp_path, "defaults: {weight_bits: 4}\n"))


def test_rules_not_a_list():
    with pytest.raises(StrategyError, match="'rules' must be a list"):
        Strategy.from_dict({"rules": {"match": "a"}})


def test_rule_without_match(tmp_path):
    text = "rules:\n  - match: a\n  - weight_bits: 4\n"
    with pytest.raises(StrategyError, match=r"rule 2: each rule is a mapping with a 'match' pattern"):
        Strategy.from_yaml(write(tmp_path, text))
    with pytest.raises(StrategyError, match="'match' must be a non-empty string"):
        Strategy.from_dict({"rules": [{"match": ""}]})


def test_unknown_spec_key_lists_allowed():
    with pytest.raises(StrategyError, match=r"rule 1 \('enc\*'\): unknown keys \['wbits'\]; allowed: " + ALLOWED):
        Strategy.from_dict({"rules": [{"match": "enc*", "wbits": 4}]})
    with pytest.raises(StrategyError, match=r"default: unknown keys \['bits'\]; allowed: " + ALLOWED):
        Strategy.from_dict({"default": {"bits": 4}})


@pytest.mark.parametrize("bits", [9, 0, "abc"])
def test_bad_weight_bits(bits):
    with pytest.raises(StrategyError, match=rf"rule 1 \('a'\): weight_bits must be an integer in 1..8 or fp32, got {bits!r}"):
        Strategy.from_dict({"rules": [{"match": "a", "weight_bits": bits}]})
    with pytest.raises(StrategyError, match=r"default: act_bits must be an integer"):
        Strategy.from_dict({"default": {"act_bits": bits}})


def test_unknown_methods():
    with pytest.raises(StrategyError, match="unknown weight_method 'gptq'"):
        Strategy.from_dict({"rules": [{"match": "a", "weight_method": "gptq"}]})
    with pytest.raises(StrategyError, match="unknown act_method 'kl'"):
        Strategy.from_dict({"default": {"act_method": "kl"}})
    # 'fixed' is internal (softmax probabilities), not a strategy choice
    with pytest.raises(StrategyError, match="unknown act_method 'fixed'"):
        Strategy.from_dict({"default": {"act_method": "fixed"}})


def test_invalid_regex():
    with pytest.raises(StrategyError, match=r"rule 2: invalid regular expression 'encoder\.layers\.\(': missing \)"):
        Strategy.from_dict({"rules": [{"match": "a"}, {"match": "re:encoder.layers.(", "weight_bits": 4}]})


def test_group_without_group_size():
    with pytest.raises(StrategyError, match="granularity 'group' needs group_size"):
        Strategy.from_dict({"rules": [{"match": "a", "granularity": "group"}]})
    with pytest.raises(StrategyError, match="unknown granularity 'row'"):
        Strategy.from_dict({"default": {"granularity": "row"}})


def test_pattern_matching_no_module_is_an_error(tmp_path):
    # a strategy written for another model (fairseq transformer names) applied to Tiny
    path = write(tmp_path, "rules:\n  - match: 'encoder.layers.*'\n  - match: 'decoder.layers.*.fc1'\n    weight_bits: 2\n")
    model = Tiny()
    with pytest.raises(StrategyError, match=r"rule 2 pattern 'decoder\.layers\.\*\.fc1' matches no module; "
                                            r"modules look like 'encoder\.layers\.0\.fc1'"):
        quantize_model(model, Strategy.from_yaml(path))
    # nothing was swapped
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# round trip, fp32 rules, group divisibility
# ---------------------------------------------------------------------------------------------

def test_uniform_and_round_trip(tmp_path):
    s = Strategy.uniform(4, 8)
    assert s.default == QuantSpec(weight_bits=4, act_bits=8) and s.rules == []
    d = s.to_dict()
    assert d == {"default": {"weight_bits": 4, "act_bits": 8, "granularity": "channel", "group_size": None,
                             "weight_method": "lsq", "act_method": "minmax", "act_granularity": "tensor",
                             "act_groups": None, "co_weight_bits": None}, "rules": []}
    s2 = Strategy.from_dict(d)
    assert s2.default == s.default and s2.rules == []
    # a strategy with rules (fp32, regex, groups) round-trips too
    s = Strategy.from_yaml(write(tmp_path, STRATEGY_YAML))
    s2 = Strategy.from_dict(s.to_dict())
    assert s2.default == s.default
    assert [(r.pattern, r.spec) for r in s2.rules] == [(r.pattern, r.spec) for r in s.rules]
    assert s.to_dict()["rules"][2]["act_bits"] == "fp32"


def test_fp32_rule_leaves_float_linear():
    model = Tiny()
    proj = model.decoder.out_proj
    s = Strategy.from_dict({"default": {"weight_bits": 4, "act_bits": 8},
                            "rules": [{"match": "decoder.*", "weight_bits": "fp32", "act_bits": "fp32"}]})
    report = quantize_model(model, s)
    assert type(model.decoder.out_proj) is nn.Linear and model.decoder.out_proj is proj
    entry = [e for e in report.layers if e.name == "decoder.out_proj"]
    assert len(entry) == 1
    assert (entry[0].kind, entry[0].spec_label, entry[0].rule, entry[0].params) == (
        "Linear", "fp32", "rule 1: decoder.*", 320)
    assert ("decoder.out_proj.weight", 320) in report.fp32_params
    assert ("decoder.out_proj.bias", 10) in report.fp32_params
    # 4 x 1024 weights at 4 bits and 320 fp32 weights
    assert report.avg_weight_bits == pytest.approx((4 * 4096 + 32 * 320) / (4096 + 320))
    assert all(isinstance(l, QuantLinear) for layer in model.encoder.layers for l in (layer.fc1, layer.fc2))


def test_group_size_not_dividing_input_names_module():
    model = Tiny(out_in=24)
    s = Strategy.from_dict({"default": {"weight_bits": 4, "granularity": "group", "group_size": 16}})
    with pytest.raises(ValueError, match=r"decoder\.out_proj.*24 input values per output channel are not "
                                         r"divisible by group size 16"):
        quantize_model(model, s)


# ---------------------------------------------------------------------------------------------
# rules on composite modules
# ---------------------------------------------------------------------------------------------

def test_rule_on_a_container_reaches_every_leaf_inside_unless_a_more_specific_rule_matches():
    model = Tiny()
    s = Strategy.from_dict({"default": {"weight_bits": 2, "act_bits": 8},
                            "rules": [{"match": "encoder.layers.0", "weight_bits": 8},
                                      {"match": "re:.*fc2", "weight_bits": 4}]})
    assert s.lookup("encoder.layers.0.fc1") == (QuantSpec(8, 8), 0)
    assert s.lookup("encoder.layers.0.fc2") == (QuantSpec(4, 8), 1)  # the leaf's own rule beats its parent's
    report = quantize_model(model, s)
    rows = {e.name: (e.spec_label, e.rule) for e in report.layers}
    assert rows == {
        "encoder.layers.0.fc1": ("w8a8", "rule 1: encoder.layers.0"),
        "encoder.layers.0.fc2": ("w4a8", "rule 2: re:.*fc2"),
        "encoder.layers.1.fc1": ("w2a8", "default"),
        "encoder.layers.1.fc2": ("w4a8", "rule 2: re:.*fc2"),
        "decoder.out_proj": ("w2a8", "default"),
    }
    assert model.encoder.layers[0].fc1.weight_quantizer.bits == 8


def test_a_negative_index_names_a_module_counted_from_the_end_of_its_list(tmp_path):
    """``encoder.layers.-1`` is the last encoder layer whatever the depth: layer 1 of Tiny's two, layer 4 of five;
    ``-2`` the one before it."""
    path = write(tmp_path, "default: {weight_bits: 2, act_bits: 8}\nrules:\n  - match: encoder.layers.-1\n"
                           "    act_bits: 16\n  - match: encoder.layers.-2.fc2\n    weight_bits: 4\n")
    strategy = Strategy.from_yaml(path)
    model = Tiny()
    report = quantize_model(model, strategy)
    rows = {e.name: (e.spec_label, e.rule) for e in report.layers}
    assert rows == {
        "encoder.layers.0.fc1": ("w2a8", "default"),
        "encoder.layers.0.fc2": ("w4a8", "rule 2: encoder.layers.0.fc2"),
        "encoder.layers.1.fc1": ("w2a16", "rule 1: encoder.layers.1"),
        "encoder.layers.1.fc2": ("w2a16", "rule 1: encoder.layers.1"),
        "decoder.out_proj": ("w2a8", "default"),
    }
    rows = {e.name: e.spec_label for e in quantize_model(Tiny(layers=5), strategy).layers}
    assert [rows[f"encoder.layers.{i}.fc1"] for i in range(5)] == ["w2a8"] * 4 + ["w2a16"]
    assert [rows[f"encoder.layers.{i}.fc2"] for i in range(5)] == ["w2a8"] * 3 + ["w4a8", "w2a16"]
    # the file keeps the relative pattern; a lookup without a model is refused rather than guessed
    assert Strategy.from_dict(strategy.to_dict()).rules[0].pattern == "encoder.layers.-1"
    with pytest.raises(StrategyError, match=r"pattern 'encoder\.layers\.-1' counts from the end of a module list; "
                                            r"bind the strategy"):
        strategy.spec_for("encoder.layers.1.fc1")
    assert strategy.bind(["encoder.layers.0.fc1", "encoder.layers.1.fc1"]).spec_for("encoder.layers.1.fc1").act_bits == 16


@pytest.mark.parametrize("pattern, message", [
    ("encoder.layers.-3", r"encoder\.layers has 2 numbered modules, so -3 names none"),
    ("decoder.out_proj.-1", r"decoder\.out_proj has no numbered modules to count -1 from"),
    ("encoder.*.-1", r"the segments before the negative index -1 must name one module list, without wildcards"),
])
def test_a_negative_index_that_names_no_module_is_one_clear_error(tmp_path, pattern, message):
    path = write(tmp_path, f"rules:\n  - match: '{pattern}'\n    weight_bits: 4\n")
    model = Tiny()
    with pytest.raises(StrategyError, match=rf"strategy\.yaml: rule 1: pattern '{re.escape(pattern)}': {message}"):
        quantize_model(model, Strategy.from_yaml(path))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_the_recipes_outlier_site_is_the_encoders_output_projection_at_any_depth(dict_dir):
    """The out16 strategies name the site as ``encoder.transformer_layers.-1``: in the tiny test arch (list:
    Linear adapter, 2 transformer layers, output projection, LayerNorm) that is module 3, not the reference
    arch's 5; the fp32 LayerNorm after it is not counted."""
    from conftest import build_tiny

    strategy = Path(__file__).resolve().parents[1] / "recipes" / "librispeech" / "strategies" / "w8a8-out16.yaml"
    _, model, _ = build_tiny(dict_dir, extra=["--quant-strategy", str(strategy)])
    assert type(model.encoder.transformer_layers[4]) is nn.LayerNorm
    wide = {e.name: e.rule for e in model.quant_report.layers if e.spec_label == "w8a16"}
    assert wide == {"encoder.transformer_layers.3": "rule 1: encoder.transformer_layers.3"}
    assert model.encoder.transformer_layers[3].input_quantizer.bits == 16


def test_rule_on_attention_reaches_its_projections(dict_dir, tmp_path):
    from conftest import build_tiny

    path = write(tmp_path, "default: {weight_bits: 2, act_bits: 8}\n"
                           "rules:\n  - match: encoder.transformer_layers.*.self_attn\n    weight_bits: 8\n"
                           "  - match: 're:encoder\\.transformer_layers\\.2\\.self_attn\\.k_proj'\n    weight_bits: 4\n")
    _, model, _ = build_tiny(dict_dir, extra=["--quant-strategy", str(path)])
    rule1 = "rule 1: encoder.transformer_layers.*.self_attn"
    rows = {e.name: (e.spec_label, e.rule) for e in model.quant_report.layers}
    for layer in (1, 2):  # transformer_layers 0 and 3 are the encoder's Linear adapters
        attn = f"encoder.transformer_layers.{layer}.self_attn"
        assert rows[attn] == ("w8a8", rule1)
        for proj in ("q_proj", "v_proj", "out_proj"):
            assert rows[f"{attn}.{proj}"] == ("w8a8", rule1)
            assert model.get_submodule(f"{attn}.{proj}").weight_quantizer.bits == 8
    assert rows["encoder.transformer_layers.1.self_attn.k_proj"] == ("w8a8", rule1)
    assert rows["encoder.transformer_layers.2.self_attn.k_proj"] == (
        "w4a8", r"rule 2: re:encoder\.transformer_layers\.2\.self_attn\.k_proj")
    assert rows["encoder.transformer_layers.1.fc1"] == ("w2a8", "default")
    assert rows["decoder.layers.0.self_attn.q_proj"] == ("w2a8", "default")
    text = model.quant_report.format()
    assert "encoder.transformer_layers.1.self_attn.q_proj" in text and rule1 in text


def test_fp32_attention_with_a_quantized_projection_inside(dict_dir, tmp_path):
    from conftest import VOCAB, build_tiny, calibrate_tiny, fbank_batch

    from fairseq_quant.quant import QuantMultiheadAttention

    path = write(tmp_path, "default: {weight_bits: 4, act_bits: 8}\n"
                           "rules:\n  - match: 're:.*\\.q_proj'\n    weight_bits: 2\n"
                           "  - match: encoder.transformer_layers.1.self_attn\n    weight_bits: fp32\n    act_bits: fp32\n")
    _, model, _ = build_tiny(dict_dir, extra=["--quant-strategy", str(path)])
    attn = model.encoder.transformer_layers[1].self_attn
    assert isinstance(attn, QuantMultiheadAttention) and attn.spec.is_fp32
    assert attn.q_proj.weight_quantizer.bits == 2 and attn.q_proj.input_quantizer.bits == 8
    assert attn.k_proj.weight_quantizer.bits is None and attn.q_quantizer.bits is None
    x, lengths, prev = fbank_batch(1)
    calibrate_tiny(model)  # calibrates like any other layer
    model.train()
    out, _ = model(x, lengths, prev)  # and trains
    assert out.shape == (3, 7, VOCAB + 4) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# uniform flags: the same one-line errors as strategy files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--quant-weight-bits", "9"], "--quant-weight-bits 9: weight_bits must be an integer in 1..8 or fp32, got 9"),
    (["--quant-weight-bits", "4", "--quant-act-bits", "x"],
     "--quant-act-bits x: act_bits must be an integer in 1..8, 16 or fp32, got 'x'"),
    (["--quant-weight-bits", "4", "--quant-act-method", "kl"],
     "--quant-act-method kl: unknown act_method 'kl'; expected one of ('minmax', 'percentile', 'mse', 'pact', 'lsq')"),
    (["--quant-weight-bits", "4", "--quant-weight-method", "gptq"],
     "--quant-weight-method gptq: unknown weight_method 'gptq'; expected one of ('minmax', 'symmetric', 'lsq', 'balanced', 'binary')"),
    (["--quant-weight-bits", "4", "--quant-granularity", "group"],
     "--quant-granularity group: granularity 'group' needs group_size"),
    (["--quant-weight-bits", "4", "--quant-granularity", "group", "--quant-group-size", "0"],
     "--quant-group-size 0: group_size must be >= 1, got 0"),
    (["--quant-weight-bits", "4", "--quant-granularity", "group", "--quant-group-size", "7"],
     "--quant-weight-bits 4 --quant-granularity group --quant-group-size 7: encoder.conv_layers.0.layers.0: "
     "9 input values per output channel are not divisible by group size 7"),
])
def test_uniform_flag_errors_name_the_flag(dict_dir, flags, message):
    from conftest import build_tiny

    with pytest.raises(StrategyError) as err:
        build_tiny(dict_dir, extra=flags)
    assert str(err.value) == message
