"""Operand-level honesty audit: intercept every linear / conv / matmul / bmm / embedding call during a
forward pass and check that its weight operand has at most 2^b distinct values per quantization group
and its activation operands at most 2^a distinct values per tensor.

A module that bypasses quantization (a float Linear, fairseq's attention fast path calling
``F.multi_head_attention_forward`` with raw weights, a stale float weight cache) shows up as a
violation naming the module and the op.
"""
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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
    distinct: int
    allowed: int

    def __str__(self) -> str:
        return (f"{self.module or '<root>'}: {self.op} {self.operand} has {self.distinct} distinct values "
                f"per group (allowed {self.allowed})")


@dataclass
class AuditReport:
    ops: list[tuple[str, str]] = field(default_factory=list)  # (module, op) for every intercepted call
    violations: list[Violation] = field(default_factory=list)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, op in self.ops:
            counts[op] = counts.get(op, 0) + 1
        return counts


def _weight_groups(op: str, w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if op == "conv_tbc":  # [kernel, in, out] -> [out, kernel * in]
        w = w.permute(2, 0, 1)
    rows = w.reshape(w.shape[0], -1)
    if group_size and rows.shape[1] % group_size == 0:
        # finer groups never undercount a coarser grid; rows that cannot be grouped are checked whole
        rows = rows.reshape(-1, group_size)
    return rows


def max_distinct_per_row(rows: torch.Tensor) -> int:
    """Largest number of distinct values in any row."""
    sorted_rows, _ = rows.detach().float().sort(dim=1)
    distinct = 1 + (sorted_rows[:, 1:] != sorted_rows[:, :-1]).sum(dim=1)
    return int(distinct.max()) if distinct.numel() else 0


def distinct_values(t: torch.Tensor) -> int:
    return int(torch.unique(t.detach().float()).numel())


class _Auditor(TorchFunctionMode):
    def __init__(self, report, module_stack, weight_bits, act_bits, group_size):
        super().__init__()
        self.report, self.stack = report, module_stack
        self.weight_levels = 2**weight_bits if weight_bits else None
        self.act_levels = 2**act_bits if act_bits else None
        self.group_size = group_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        module = self.stack[-1] if self.stack else ""
        if name in BYPASS_OPS:
            self.report.ops.append((module, name))
            self.report.violations.append(Violation(module, name, "all operands (bypasses quantized layers)", -1, 0))
        elif name in WEIGHT_OPS:
            self.report.ops.append((module, name))
            act_idx, w_idx = WEIGHT_OPS[name]
            weight = args[w_idx] if len(args) > w_idx else kwargs.get("weight")
            if self.weight_levels and weight is not None:
                d = max_distinct_per_row(_weight_groups(name, weight, self.group_size))
                if d > self.weight_levels:
                    self.report.violations.append(Violation(module, name, "weight", d, self.weight_levels))
            self._check_acts(module, name, [args[i] for i in act_idx])
        elif name in MATMUL_OPS:
            self.report.ops.append((module, name))
            idx = MATMUL_OPS[name]
            operands = [a for a in args[1:] if isinstance(a, torch.Tensor)] if idx is None else [args[i] for i in idx]
            self._check_acts(module, name, operands)
        return func(*args, **kwargs)

    def _check_acts(self, module, op, operands):
        if not self.act_levels:
            return
        for i, t in enumerate(operands):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                d = distinct_values(t)
                if d > self.act_levels:
                    self.report.violations.append(Violation(module, op, f"activation operand {i}", d, self.act_levels))


def audit(model: nn.Module, run, weight_bits: int | None, act_bits: int | None,
          group_size: int | None = None) -> AuditReport:
    """Call ``run()`` (which drives ``model``) under interception and return what every op was fed.

    ``weight_bits``/``act_bits`` are the allowed bit widths of a uniform allocation (None: not checked).
    """
    report = AuditReport()
    stack: list[str] = []
    handles = []

    def enter(name):
        def hook(module, args):
            stack.append(name)  # returns None: inputs unchanged
        return hook

    def leave(module, args, output):
        stack.pop()  # returns None: output unchanged

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with _Auditor(report, stack, weight_bits, act_bits, group_size):
            run()
    finally:
        for h in handles:
            h.remove()
    return report


__all__ = ["AuditReport", "Violation", "audit", "distinct_values", "max_distinct_per_row"]
