"""Exact allocation under a budget: a 0/1 integer program solved by HiGHS (``scipy.optimize.milp``).

Variables ``x[u, b]`` (unit ``u`` at ``b`` bits), one width per unit, minimise the sum of the units'
sensitivities ``s[u, b]`` subject to the budget (average weight bits and/or MB, both linear in ``x``).
The ``k`` best allocations come from re-solving with a no-good cut that excludes each solution found.
"""
from __future__ import annotations

import numpy as np

from .space import SearchError, UnitCosts


def solve_allocations(units: list[str], bits: list[int], score: dict[str, dict[int, float]], costs: UnitCosts,
                      budget_bits: float | None = None, budget_mb: float | None = None, k: int = 1,
                      time_limit: float = 60.0) -> list[tuple[dict[str, int], float]]:
    """Up to ``k`` allocations ``({unit: bits}, objective)`` in increasing objective order (ties broken by
    the solver deterministically). Raises :class:`SearchError` when no allocation fits the budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if budget_bits is None and budget_mb is None:
        raise SearchError("give a budget: average weight bits or MB")
    index = [(u, b) for u in units for b in bits if b in score[u]]  # a unit's widths: those it has a score for
    n = len(index)
    c = np.array([score[u][b] for u, b in index], dtype=np.float64)
    rows, lo, hi = [], [], []
    for u in units:  # exactly one width per unit
        rows.append([1.0 if uu == u else 0.0 for uu, _ in index])
        lo.append(1.0)
        hi.append(1.0)
    if budget_bits is not None:
        total = sum(costs.numel[u] for u in units)
        rows.append([costs.numel[u] * b for u, b in index])
        lo.append(-np.inf)
        hi.append(budget_bits * total + 1e-6 * total)
    if budget_mb is not None:
        rows.append([costs.bytes[u][b] for u, b in index])
        lo.append(-np.inf)
        hi.append(budget_mb * 1e6 - costs.constant_bytes + 1e-6)
    found = []
    for _ in range(k):
        constraints = LinearConstraint(np.array(rows), np.array(lo), np.array(hi))
        res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "presolve": True})
        if res.status != 0 or res.x is None:
            if not found:
                smallest = {u: min(b for uu, b in index if uu == u) for u in units}
                raise SearchError(f"no allocation fits the budget (bits {budget_bits}, MB {budget_mb}); the smallest "
                                  f"({min(bits)} bits wherever a unit allows it) is {costs.avg_bits(smallest):.3f} "
                                  f"average weight bits, {costs.mb(smallest):.4f} MB")
            break
        chosen = [index[i] for i in range(n) if res.x[i] > 0.5]
        allocation = {u: b for u, b in chosen}
        found.append((allocation, float(sum(score[u][b] for u, b in chosen))))
        # no-good cut: at most len(units) - 1 of these choices again
        rows.append([1.0 if (u, b) in set(chosen) else 0.0 for u, b in index])
        lo.append(-np.inf)
        hi.append(len(units) - 1)
    return found


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (scipy), None when it is undefined (fewer than 3 points or constant)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, error) that no other point beats in both (smaller is better)."""
    front = []
    for i, (s, e) in enumerate(points):
        if not any((s2 <= s and e2 <= e) and (s2 < s or e2 < e) for j, (s2, e2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])
