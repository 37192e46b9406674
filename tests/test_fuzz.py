"""Property-based tests (hypothesis) of user input: the strategy parser over random YAML documents and
random bytes, and checkpoint loading over truncated and bit-flipped checkpoints. Each input either works or
fails with one FairseqQuantError whose one-line message names the file; nothing raises from deep inside."""
import shutil

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fairseq_quant.quant import FairseqQuantError, Strategy, StrategyError, quantize_model

KEYS = ["default", "rules", "description", "match", "weight_bits", "act_bits", "granularity", "group_size",
        "weight_method", "act_method"]
WORDS = ["fp32", "float", "none", "lsq", "minmax", "symmetric", "binary", "percentile", "mse", "pact", "fixed", "kl",
         "tensor", "channel", "group", "fc1", "layers.*", "re:layers\\.\\d+\\.fc[12]", "re:(", "re:a{2,1}", "*", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(allow_nan=True),
                    st.sampled_from(WORDS), st.text(max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-2, 2), st.none(), st.booleans())
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=6)), max_leaves=30)
# strategy-shaped documents, mostly valid values: they reach quantize_model (groups that do not divide a
# layer, patterns that match nothing, ...)
BITS = [1, 2, 3, 4, 8, 9, 0, 32, "fp32", "x"]
spec = st.fixed_dictionaries({}, optional={
    "weight_bits": st.sampled_from(BITS), "act_bits": st.sampled_from(BITS),
    "granularity": st.sampled_from(["tensor", "channel", "group", "row"]),
    "group_size": st.sampled_from([None, 1, 4, 8, 16, 7, 0]),
    "weight_method": st.sampled_from(["lsq", "minmax", "symmetric", "binary", "gptq"]),
    "act_method": st.sampled_from(["minmax", "percentile", "mse", "pact", "lsq", "fixed"])})
PATTERNS = ["layers.*", "layers.0", "layers.*.fc1", "re:layers\\.\\d+\\.fc[12]", "out", "*", "nomatch.*", "re:("]
rule = st.builds(lambda match, fields: {"match": match, **fields}, st.sampled_from(PATTERNS), spec)
strategy_like = st.fixed_dictionaries({}, optional={"default": spec, "rules": st.lists(rule, max_size=4),
                                                    "description": scalars})


def model():
    """Modules layers.0.fc1/fc2 and layers.1.fc1/fc2 (Linear 32 -> 24 -> 32), out (Linear 32 -> 10)."""
    net = nn.Module()
    net.layers = nn.ModuleList()
    for _ in range(2):
        layer = nn.Module()
        layer.fc1, layer.fc2 = nn.Linear(32, 24), nn.Linear(24, 32)
        net.layers.append(layer)
    net.out = nn.Linear(32, 10)
    return net


def check_strategy_file(path):
    try:
        strategy = Strategy.from_yaml(path)
    except StrategyError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)
        return
    try:
        quantize_model(model(), strategy)
    except StrategyError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.one_of(documents, strategy_like))
def test_strategy_parser_on_random_yaml_documents(tmp_path, document):
    path = tmp_path / "strategy.yaml"
    path.write_text(yaml.safe_dump(document))
    check_strategy_file(path)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_strategy_parser_on_random_bytes(tmp_path, data):
    path = tmp_path / "strategy.yaml"
    path.write_bytes(data)
    check_strategy_file(path)


def test_strategy_errors_found_by_fuzzing(tmp_path):
    """Inputs that raised from deep inside before (each now one StrategyError naming the file)."""
    cases = {
        "bad_utf8.yaml": b"default: {weight_bits: \xff}\n",
        "int_keys.yaml": b"default: {1: 2, weight_bits: 4}\n",
        "huge_group.yaml": b"default: {granularity: group, group_size: .inf}\n",
        "yaml_error.yaml": b"default: {weight_bits: 8\nrules: [\n",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        try:
            Strategy.from_yaml(path)
        except StrategyError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)
        else:
            raise AssertionError(f"{name} was accepted")


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def reference(smoke):
    work, _ = smoke
    return work / "qat" / "qat-w4a8" / "checkpoint_best.pt", work / "data"


def load(path, data):
    from fairseq_quant.evaluate import load_checkpoint

    return load_checkpoint(path, data)[0]


def check_checkpoint(path, data, original_state):
    try:
        model = load(path, data)
    except FairseqQuantError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)
        return
    state = model.state_dict()  # loaded: then exactly what was saved
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[k], original_state[k]) for k in state if isinstance(state[k], torch.Tensor))


CKPT = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@CKPT
@given(st.data())
def test_truncated_checkpoints(smoke, tmp_path_factory, data):
    source, data_dir = reference(smoke)
    raw = source.read_bytes()
    cut = data.draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(len(raw) - 4096, len(raw) - 1)))
    path = tmp_path_factory.mktemp("truncated") / "checkpoint.pt"
    path.write_bytes(raw[:cut])
    check_checkpoint(path, data_dir, ORIGINAL.get(source) or original_state(source, data_dir))


@CKPT
@given(st.data())
def test_bit_flipped_checkpoints(smoke, tmp_path_factory, data):
    source, data_dir = reference(smoke)
    raw = bytearray(source.read_bytes())
    where = data.draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(0, 4095),
                                st.integers(len(raw) - 4096, len(raw) - 1)))
    raw[where] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path_factory.mktemp("flipped") / "checkpoint.pt"
    path.write_bytes(bytes(raw))
    check_checkpoint(path, data_dir, ORIGINAL.get(source) or original_state(source, data_dir))


ORIGINAL = {}


def original_state(source, data_dir):
    ORIGINAL[source] = load(source, data_dir).state_dict()
    return ORIGINAL[source]


def test_evaluate_leaves_no_output_for_a_corrupted_checkpoint(smoke, tmp_path):
    from fairseq_quant.evaluate import evaluate

    source, data_dir = reference(smoke)
    broken = tmp_path / "broken.pt"
    shutil.copy(source, broken)
    with open(broken, "r+b") as f:
        f.seek(broken.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    try:
        evaluate(broken, data_dir, ["test-clean"], tmp_path / "eval", beam=1, progress=False)
    except FairseqQuantError as err:
        assert str(err).startswith(f"{broken}: ") and "CRC" in str(err)
    else:
        raise AssertionError("a corrupted checkpoint was decoded")
    assert not (tmp_path / "eval").exists()
