"""Strategy search: which units (layers, blocks, modules) may drop to which weight bits under a size budget.

- :mod:`.space` units, their sizes and quantization errors per width, allocations as strategies (pure PyTorch)
- :mod:`.proxy` decode-free sensitivities: Hutchinson Hessian traces, empirical Fisher traces (pure PyTorch)
- :mod:`.solver` the exact allocation (0/1 integer program, HiGHS via scipy), Spearman correlation, Pareto front
- :mod:`.evaluator` measurements on a fairseq checkpoint (post-training quantization, calibration,
  teacher-forced loss, beam-search WER) run in worker processes or Ray tasks
- :mod:`.runner` the search itself, its resumable state and its outputs (``scripts/search_strategy.py``)
"""
from .solver import pareto_front, solve_allocations, spearman
from .space import SearchError, Unit, UnitCosts, allocation_strategy, model_units, unit_costs

__all__ = ["SearchError", "Unit", "UnitCosts", "allocation_strategy", "model_units", "pareto_front",
           "solve_allocations", "spearman", "unit_costs"]
