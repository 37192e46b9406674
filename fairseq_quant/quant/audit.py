"""Operand-level honesty audit: intercept every linear / conv / matmul / bmm / embedding call during a
forward pass and check that each operand lies on the grid of a quantizer of the module that made the call:
weights on the module's weight quantizer's grid (per group), activations on the grid of one of its
activation quantizers, each value equal to ``offset + q * scale`` for an integer ``q`` in range (within
float tolerance). The check holds at every bit width, where counting distinct values cannot tell an 8-bit
row from a float row of fewer than 256 values.

A module that bypasses quantization (a float Linear, fairseq's attention fast path calling
``F.multi_head_attention_forward`` with raw weights, a stale float weight cache) shows up as a
violation naming the module and the op.
"""
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .quantizers import ActivationQuantizer, WeightQuantizer

# op name -> (index of the activation operands, index of the weight operand or None)
WEIGHT_OPS = {"linear": ((0,), 1), "conv1d": ((0,), 1), "conv2d": ((0,), 1), "conv_tbc": ((0,), 1),
              "embedding": ((), 1)}
MATMUL_OPS = {"bmm": (0, 1), "matmul": (0, 1), "mm": (0, 1), "__matmul__": (0, 1), "baddbmm": (1, 2),
              "addmm": (1, 2), "einsum": None}
BYPASS_OPS = {"multi_head_attention_forward", "scaled_dot_product_attention"}


@dataclass
class Violation:
    module: str
    op: str
    operand: str
    problem: str

    def __str__(self) -> str:
        return f"{self.module or '<root>'}: {self.op} {self.operand} {self.problem}"


@dataclass
class AuditReport:
    ops: list[tuple[str, str]] = field(default_factory=list)  # (module, op) for every intercepted call
    violations: list[Violation] = field(default_factory=list)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, op in self.ops:
            counts[op] = counts.get(op, 0) + 1
        return counts


def weight_layout(op: str, w: torch.Tensor) -> torch.Tensor:
    """The op's weight in the output-channel-first layout its quantizer saw."""
    if op == "conv_tbc":  # [kernel, in, out] -> [out, kernel * in]
        return w.permute(2, 0, 1).reshape(w.shape[2], -1)
    return w


def weight_problem(quantizer, op: str, w: torch.Tensor, max_bits: int) -> str | None:
    """Why ``w`` is not an output of ``quantizer`` (None when it is)."""
    if quantizer is None or not quantizer.enabled:
        return "is not quantized (no weight quantizer)"
    if quantizer.active_bits > max_bits:  # the precision it runs at (a co-trained one: the one chosen)
        return f"is quantized to {quantizer.active_bits} bits, more than the {max_bits} allowed"
    grid = quantizer.last_grid
    groups = quantizer.granularity.group_view(weight_layout(op, w))
    if grid is None or grid.scale.shape[0] != groups.shape[0]:
        return f"is not the output of {quantizer.name}'s quantizer"
    off = int(grid.off_grid(groups).sum())
    return f"has {off} of {groups.numel()} values off the {grid.bits}-bit grid of {quantizer.name}" if off else None


def activation_problem(quantizers, t: torch.Tensor, max_bits: int) -> str | None:
    """Why ``t`` is on the grid of none of ``quantizers`` (None when it is on one)."""
    enabled = [q for q in quantizers if q.enabled and q.last_grid is not None]
    if not enabled:
        return "is not quantized (no activation quantizer)"
    best = None
    for q in enabled:
        off = int(q.last_grid.off_grid(t).sum())
        if off == 0:
            return None if q.bits <= max_bits else f"is quantized to {q.bits} bits, more than the {max_bits} allowed"
        best = min(best or (off, q.name), (off, q.name))
    return f"has {best[0]} of {t.numel()} values off the grid of {best[1]} (closest of {len(enabled)})"


class _Auditor(TorchFunctionMode):
    def __init__(self, report, module_stack, weight_bits, act_bits):
        super().__init__()
        self.report, self.stack = report, module_stack
        self.weight_bits, self.act_bits = weight_bits, act_bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        module_name, module = self.stack[-1] if self.stack else ("", None)
        if name in BYPASS_OPS:
            self.report.ops.append((module_name, name))
            self._violation(module_name, name, "all operands", "bypass the quantized layers")
        elif name in WEIGHT_OPS:
            self.report.ops.append((module_name, name))
            act_idx, w_idx = WEIGHT_OPS[name]
            weight = args[w_idx] if len(args) > w_idx else kwargs.get("weight")
            if self.weight_bits and weight is not None:
                with torch.no_grad():
                    problem = weight_problem(getattr(module, "weight_quantizer", None), name, weight,
                                             self.weight_bits)
                self._violation(module_name, name, "weight", problem)
            self._check_acts(module_name, module, name, [args[i] for i in act_idx])
        elif name in MATMUL_OPS:
            self.report.ops.append((module_name, name))
            idx = MATMUL_OPS[name]
            operands = [a for a in args[1:] if isinstance(a, torch.Tensor)] if idx is None else [args[i] for i in idx]
            self._check_acts(module_name, module, name, operands)
        return func(*args, **kwargs)

    def _violation(self, module_name, op, operand, problem):
        if problem:
            self.report.violations.append(Violation(module_name, op, operand, problem))

    def _check_acts(self, module_name, module, op, operands):
        if not self.act_bits:
            return
        quantizers = [m for m in module.children() if isinstance(m, ActivationQuantizer)] if module is not None else []
        for i, t in enumerate(operands):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                with torch.no_grad():
                    self._violation(module_name, op, f"activation operand {i}",
                                    activation_problem(quantizers, t, self.act_bits))


def audit(model: nn.Module, run, weight_bits: int | None = None, act_bits: int | None = None) -> AuditReport:
    """Call ``run()`` (which drives ``model``) under interception and return what every op was fed.

    ``weight_bits``/``act_bits`` are the most bits a weight / activation quantizer may use (None: that kind
    of operand is not checked).
    """
    report = AuditReport()
    stack: list[tuple[str, nn.Module]] = []
    handles = []

    def enter(name):
        def hook(module, args):
            stack.append((name, module))  # returns None: inputs unchanged
        return hook

    def leave(module, args, output):
        stack.pop()  # returns None: output unchanged

    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            continue  # a quantizer's own arithmetic is not an operand of the model
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with _Auditor(report, stack, weight_bits, act_bits):
            run()
    finally:
        for h in handles:
            h.remove()
    return report


__all__ = ["AuditReport", "Violation", "activation_problem", "audit", "weight_problem"]
