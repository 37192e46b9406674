"""QuantSpec: how one module is quantized (weight and activation bits, granularity, methods)."""
from dataclasses import asdict, dataclass, fields, replace

from .granularity import Granularity, parse_granularity
from .quantizers import ACT_GRANULARITIES, ACT_METHODS, WEIGHT_METHODS, check_bits

FP32_WORDS = ("fp32", "float", "none", None, 32)


def parse_bits(value, what: str, activation: bool = False):
    """8 -> 8, 'fp32' / None / 32 -> None (no quantization); anything else outside 1..8 (activations: and 16) is an
    error."""
    if isinstance(value, str) and value.lower() in FP32_WORDS:
        return None
    if value in FP32_WORDS:
        return None
    return check_bits(value, what, activation=activation)


class SpecError(ValueError):
    """An invalid QuantSpec field; ``field`` names it (so callers can name their own flag or key)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of one module. ``None`` bits mean fp32 for that operand."""

    weight_bits: int | None = 8
    act_bits: int | None = 8
    granularity: str = "channel"
    group_size: int | None = None
    weight_method: str = "lsq"
    act_method: str = "minmax"
    act_granularity: str = "tensor"  # activation ranges: per tensor, per channel group ("peg"), per token
    act_groups: int | None = None  # act_granularity peg: the number of channel groups (divides every input width)
    # multi-precision co-training: the other weight precisions the same latent weights are also trained at (each
    # with its own learned step under lsq); the module is deployed at any one of them (coprecision.collapse)
    co_weight_bits: tuple | None = None

    def __post_init__(self):
        for name in ("weight_bits", "act_bits"):
            try:
                object.__setattr__(self, name, parse_bits(getattr(self, name), name, activation=name == "act_bits"))
            except ValueError as err:
                raise SpecError(name, str(err)) from None
        self._check_co_weight_bits()
        if self.weight_bits == 1 and self.weight_method != "binary":
            object.__setattr__(self, "weight_method", "binary")
        if self.weight_method not in WEIGHT_METHODS:
            raise SpecError("weight_method",
                            f"unknown weight_method {self.weight_method!r}; expected one of {WEIGHT_METHODS}")
        if self.weight_method == "binary" and self.weight_bits not in (1, None):
            raise SpecError("weight_method",
                            f"weight_method 'binary' means 1-bit weights, got weight_bits={self.weight_bits}")
        if self.act_method not in ACT_METHODS or self.act_method == "fixed":
            allowed = tuple(m for m in ACT_METHODS if m != "fixed")
            raise SpecError("act_method", f"unknown act_method {self.act_method!r}; expected one of {allowed}")
        if self.act_bits == 1 and self.act_method in ("pact", "lsq"):
            raise SpecError("act_method",
                            f"act_bits=1 needs act_method minmax, percentile or mse, not {self.act_method!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise SpecError("act_granularity", f"unknown act_granularity {self.act_granularity!r}; expected one of "
                                               f"{ACT_GRANULARITIES}")
        if self.act_granularity == "peg":
            if not isinstance(self.act_groups, int) or isinstance(self.act_groups, bool) or self.act_groups < 1:
                raise SpecError("act_groups", "act_granularity peg needs act_groups, a positive number of channel "
                                              f"groups, got {self.act_groups!r}")
        elif self.act_groups is not None:
            raise SpecError("act_groups", f"act_groups ({self.act_groups!r}) applies to act_granularity peg, not "
                                          f"{self.act_granularity!r}")
        if self.act_granularity != "tensor" and self.act_method != "minmax":
            raise SpecError("act_method", f"act_granularity {self.act_granularity} uses min-max ranges (act_method "
                                          f"minmax), not {self.act_method!r}")
        try:
            parse_granularity(self.granularity, self.group_size)
        except (ValueError, TypeError, OverflowError) as err:
            field = "group_size" if self.granularity == "group" and self.group_size is not None else "granularity"
            raise SpecError(field, str(err)) from None

    def _check_co_weight_bits(self) -> None:
        """co_weight_bits: None or distinct precisions in 1..8 besides weight_bits, stored sorted high to low."""
        co = self.co_weight_bits
        if co is None or (isinstance(co, (list, tuple)) and len(co) == 0):
            object.__setattr__(self, "co_weight_bits", None)
            return
        if not isinstance(co, (list, tuple)):
            co = (co,)
        try:
            bits = [check_bits(b, "co_weight_bits") for b in co]
        except ValueError as err:
            raise SpecError("co_weight_bits", str(err)) from None
        if None in bits or len(set(bits)) != len(bits):
            raise SpecError("co_weight_bits", f"co_weight_bits must be distinct precisions in 1..8, got {list(co)!r}")
        if self.weight_bits is None or self.weight_bits in bits:
            raise SpecError("co_weight_bits", f"co_weight_bits {list(co)!r} are precisions besides weight_bits "
                                              f"({self.weight_bits!r}), which must be quantized and not among them")
        if self.weight_bits == 1 or self.weight_method == "binary":
            raise SpecError("co_weight_bits", "co-training starts from a multi-bit weight_bits (the highest "
                                              "precision), not a binary one")
        object.__setattr__(self, "co_weight_bits", tuple(sorted(bits, reverse=True)))

    @property
    def precisions(self) -> tuple:
        """The weight precisions of the module, its own first (weight_bits, then co_weight_bits high to low)."""
        return (self.weight_bits, *(self.co_weight_bits or ()))

    @property
    def weight_granularity(self) -> Granularity:
        return parse_granularity(self.granularity, self.group_size)

    @property
    def is_fp32(self) -> bool:
        return self.weight_bits is None and self.act_bits is None

    def label(self) -> str:
        w = "fp32" if self.weight_bits is None else str(self.weight_bits)
        a = "fp32" if self.act_bits is None else str(self.act_bits)
        if self.act_bits is not None and self.act_granularity == "peg":
            a += f"-peg{self.act_groups}"
        elif self.act_bits is not None and self.act_granularity == "token":
            a += "-token"
        co = f"+co{','.join(map(str, self.co_weight_bits))}" if self.co_weight_bits else ""
        return f"w{w}a{a}{co}"

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["co_weight_bits"] is not None:  # a list, as YAML and JSON write it
            out["co_weight_bits"] = list(out["co_weight_bits"])
        return out

    def updated(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


FP32 = QuantSpec(weight_bits=None, act_bits=None)


def spec_changes(stored: dict, current: dict) -> list[tuple[str, str]]:
    """(module, 'old -> new') for every module whose spec differs between two ``{module: QuantSpec.to_dict()}``
    maps (a checkpoint's and the model's), in the order of ``current`` then any names only ``stored`` has."""
    changes = []
    for name in list(current) + [n for n in stored if n not in current]:
        old, new = _complete(stored.get(name)), current.get(name)
        if old != new:
            changes.append((name, f"{_describe(old)} -> {_describe(new)}" if _describe(old) != _describe(new)
                            else ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in new if old.get(k) != new[k])))
    return changes


def _complete(spec_dict):
    """A stored spec with the fields added since it was written at their defaults (they meant the default then)."""
    if not isinstance(spec_dict, dict):
        return spec_dict
    defaults = {f.name: f.default for f in fields(QuantSpec)}
    return {**{k: v for k, v in defaults.items() if k not in spec_dict}, **spec_dict}


def _describe(spec_dict) -> str:
    if spec_dict is None:
        return "absent"
    try:
        return QuantSpec(**spec_dict).label()
    except (TypeError, ValueError):
        return str(spec_dict)
