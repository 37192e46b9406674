"""Strategies: per-layer bit allocation as ordered module-name patterns with a default.

YAML layout (a rule's missing fields come from ``default``)::

    default: {weight_bits: 8, act_bits: 8, granularity: channel, weight_method: lsq, act_method: minmax}
    rules:
      - match: "encoder.conv_layers.*"              # glob over module names
        weight_bits: 8
      - match: "re:decoder\\.layers\\.\\d+\\.fc[12]"  # "re:" prefix: a regular expression (fullmatch)
        weight_bits: 2
        granularity: group
        group_size: 64
      - match: "encoder.transformer_layers.-1"      # a negative index counts from the end of a module list
        act_bits: 16

``weight_bits``/``act_bits`` are 1..8 or ``fp32``. A module gets the first rule that matches its own
name; failing that, the first rule that matches its closest enclosing module (a rule on an attention
reaches its q/k/v/out projections, a rule on ``encoder`` everything in it); failing that, the default.

A glob pattern's segment ``-N`` (N >= 1) counts from the end of the numbered modules under the segments before it,
among the modules a strategy addresses (normalisation layers stay fp32 by design and are not counted), so that one
strategy names a site of models of any depth: fairseq's VGGTransformerEncoder ends its ``transformer_layers`` list
with the output projection and a LayerNorm, so ``encoder.transformer_layers.-1`` is that projection. :meth:`Strategy.bind` resolves these indices
against a model's module names; every use of a strategy on a model binds it first.
"""
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import FairseqQuantError
from .spec import QuantSpec


class StrategyError(FairseqQuantError, ValueError):
    """A strategy that cannot be applied: the message names the file, the rule and the problem."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: QuantSpec

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    @property
    def relative(self) -> bool:
        """Whether the pattern has a negative index segment (``-N``), to be resolved by :meth:`resolve`."""
        return not self.pattern.startswith("re:") and any(_NEGATIVE.fullmatch(p) for p in self.pattern.split("."))

    def resolve(self, scopes: set[str], where: str) -> "Rule":
        """This rule with each ``-N`` segment replaced by the index it names among ``scopes`` (module names and
        the modules around them); a glob's segments before it must be literal."""
        parts = self.pattern.split(".")
        for k, part in enumerate(parts):
            if not _NEGATIVE.fullmatch(part):
                continue
            prefix = parts[:k]
            if any(ch in seg for seg in prefix for ch in "*?["):
                raise StrategyError(f"{where}: pattern {self.pattern!r}: the segments before the negative index "
                                    f"{part} must name one module list, without wildcards")
            indices = {int(q[k]) for q in (n.split(".") for n in scopes)
                       if len(q) > k and q[:k] == prefix and q[k].isdigit()}
            owner = ".".join(prefix) or "the model"
            if not indices:
                raise StrategyError(f"{where}: pattern {self.pattern!r}: {owner} has no numbered modules to count "
                                    f"{part} from")
            index = max(indices) + 1 + int(part)
            if index not in indices:
                raise StrategyError(f"{where}: pattern {self.pattern!r}: {owner} has {max(indices) + 1} numbered "
                                    f"modules, so {part} names none")
            parts[k] = str(index)
        return Rule(".".join(parts), self.spec)


_NEGATIVE = re.compile(r"-[1-9][0-9]*")


class Strategy:
    """Ordered rules plus a default spec; ``spec_for(name)`` is the spec of the most specific matching rule."""

    def __init__(self, default: QuantSpec, rules: list[Rule] = (), source: str = "<strategy>"):
        self.default = default
        self.rules = list(rules)
        self.source = source

    @classmethod
    def uniform(cls, weight_bits, act_bits, source: str | None = None, **spec_fields) -> "Strategy":
        spec = QuantSpec(weight_bits=weight_bits, act_bits=act_bits, **spec_fields)
        return cls(spec, [], source=source or f"uniform {spec.label()}")

    @classmethod
    def from_yaml(cls, path) -> "Strategy":
        path = Path(path)
        if not path.is_file():
            raise StrategyError(f"{path}: strategy file not found")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise StrategyError(f"{path}: not UTF-8 text ({err})") from None
        except yaml.YAMLError as err:
            raise StrategyError(f"{path}: not valid YAML: {err}") from None
        except RecursionError:
            raise StrategyError(f"{path}: nested too deeply to be a strategy") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "<strategy>") -> "Strategy":
        if not isinstance(data, dict):
            raise StrategyError(f"{source}: a strategy is a mapping with 'default' and 'rules', got {type(data).__name__}")
        unknown = set(data) - {"default", "rules", "description"}
        if unknown:
            raise StrategyError(f"{source}: unknown top-level keys {sorted(unknown, key=str)}; "
                                "expected default, rules, description")
        default = _spec(data.get("default") or {}, QuantSpec(), f"{source}: default")
        rules = []
        raw_rules = data.get("rules") or []
        if not isinstance(raw_rules, list):
            raise StrategyError(f"{source}: 'rules' must be a list of mappings with a 'match' key")
        for i, raw in enumerate(raw_rules):
            where = f"{source}: rule {i + 1}"
            if not isinstance(raw, dict) or "match" not in raw:
                raise StrategyError(f"{where}: each rule is a mapping with a 'match' pattern, got {raw!r}")
            pattern = raw["match"]
            if not isinstance(pattern, str) or not pattern:
                raise StrategyError(f"{where}: 'match' must be a non-empty string")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except (re.error, OverflowError, RecursionError) as err:
                    raise StrategyError(f"{where}: invalid regular expression {pattern[3:]!r}: {err}") from None
            fields = {k: v for k, v in raw.items() if k != "match"}
            rules.append(Rule(pattern, _spec(fields, default, f"{where} ({pattern!r})")))
        return cls(default, rules, source)

    def to_dict(self) -> dict:
        def spec_dict(spec: QuantSpec) -> dict:
            out = spec.to_dict()
            for k in ("weight_bits", "act_bits"):
                out[k] = "fp32" if out[k] is None else out[k]
            return out

        return {"default": spec_dict(self.default),
                "rules": [{"match": r.pattern, **spec_dict(r.spec)} for r in self.rules]}

    def bind(self, module_names) -> "Strategy":
        """This strategy for a model whose quantizable modules are ``module_names``: every negative index
        (``-N`` segment) resolved to the module it names; the same strategy when it has none."""
        if not any(rule.relative for rule in self.rules):
            return self
        scopes = {scope for n in module_names for scope in enclosing_scopes(n)}
        rules = [rule.resolve(scopes, f"{self.source}: rule {i + 1}") if rule.relative else rule
                 for i, rule in enumerate(self.rules)]
        return Strategy(self.default, rules, self.source)

    def lookup(self, name: str) -> tuple[QuantSpec, int | None]:
        """(spec, rule index or None for the default) deciding module ``name``: rules on the module itself
        come first, then rules on each enclosing module from the closest outwards. A strategy with negative
        indices must be bound to the model first (:meth:`bind`)."""
        self._require_bound()
        for scope in enclosing_scopes(name):
            for i, rule in enumerate(self.rules):
                if rule.matches(scope):
                    return rule.spec, i
        return self.default, None

    def _require_bound(self) -> None:
        relative = next((r.pattern for r in self.rules if r.relative), None)
        if relative is not None:
            raise StrategyError(f"{self.source}: pattern {relative!r} counts from the end of a module list; bind the "
                                "strategy to the model's module names first (Strategy.bind)")

    def spec_for(self, name: str) -> QuantSpec:
        return self.lookup(name)[0]

    def check_matches(self, module_names: list[str]) -> None:
        """Every rule must match a quantizable module or a module around one (catches strategies for other
        models)."""
        self._require_bound()
        scopes = {scope for n in module_names for scope in enclosing_scopes(n)}
        for i, rule in enumerate(self.rules):
            if not any(rule.matches(n) for n in scopes):
                examples = ", ".join(f"'{n}'" for n in module_names[:3])
                raise StrategyError(
                    f"{self.source}: rule {i + 1} pattern {rule.pattern!r} matches no module; "
                    f"modules look like {examples}"
                )

    def __repr__(self) -> str:
        return f"Strategy({self.source}: default {self.default.label()}, {len(self.rules)} rules)"


def enclosing_scopes(name: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a']: the module and the modules around it, closest first."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _spec(fields, base: QuantSpec, where: str) -> QuantSpec:
    if not isinstance(fields, dict):
        raise StrategyError(f"{where}: expected a mapping of spec fields, got {fields!r}")
    unknown = set(fields) - set(QuantSpec.field_names())
    if unknown:
        raise StrategyError(f"{where}: unknown keys {sorted(unknown, key=str)}; "
                            f"allowed: {', '.join(QuantSpec.field_names())}")
    if "weight_bits" in fields and "weight_method" not in fields and base.weight_method == "binary":
        # a binary default is implied by its 1 bit; a rule that raises the bits gets the usual method
        fields = {**fields, "weight_method": QuantSpec.weight_method}
    try:
        return base.updated(**fields)
    except (ValueError, TypeError, OverflowError) as err:
        raise StrategyError(f"{where}: {err}") from None
