"""Decode-free sensitivity proxies, pure PyTorch.

- :func:`hutchinson_traces`: the trace of the loss Hessian restricted to each unit's weights,
  ``E_v[v^T H v]`` over Rademacher probes ``v`` (Hutchinson 1990; HAWQ-V2/V3). One Hessian-vector product
  (double backward) per probe and batch gives every unit's block trace at once, since the cross terms
  vanish in expectation.
- :func:`fisher_traces`: the trace of the empirical Fisher information per unit, the sum of squared
  loss gradients per batch.

The sensitivity of a unit at ``b`` bits is then ``trace / n * ||Q_b(W) - W||^2`` (HAWQ-V3's
second-order estimate of the loss increase from the perturbation ``Q_b(W) - W``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def unit_parameters(model: nn.Module, unit_modules: dict[str, tuple[str, ...]]) -> dict[str, list[nn.Parameter]]:
    """Each unit's weight parameters (two or more dimensions; not weight-norm magnitudes, biases, norms)."""
    out = {}
    for unit, modules in unit_modules.items():
        params = []
        for m in modules:
            for name, p in model.get_submodule(m).named_parameters():
                if p.dim() >= 2 and not name.endswith("weight_g"):
                    params.append(p)
        out[unit] = params
    return out


def hutchinson_traces(model: nn.Module, loss_fn, batches, unit_modules, probes: int = 8, seed: int = 0
                      ) -> tuple[dict[str, float], int]:
    """({unit: estimated Hessian trace of the mean loss over its weights}, Hessian-vector products made).

    ``loss_fn(model, batch)`` returns a scalar loss; the trace is averaged over ``batches``."""
    params = unit_parameters(model, unit_modules)
    flat = [p for ps in params.values() for p in ps]
    owner = [u for u, ps in params.items() for _ in ps]
    gen = torch.Generator().manual_seed(seed)
    sums = {u: 0.0 for u in params}
    hvps = 0
    batches = list(batches)
    # the fused attention kernels have no second derivative: the math kernel computes the same function
    with sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, flat, create_graph=True)
            for i in range(probes):
                vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in flat]
                hv = torch.autograd.grad(grads, flat, grad_outputs=vs, retain_graph=i < probes - 1)
                hvps += 1
                for u, v, h in zip(owner, vs, hv):
                    sums[u] += float((v * h).sum())
    count = probes * len(batches)
    return {u: s / count for u, s in sums.items()}, hvps


def fisher_traces(model: nn.Module, loss_fn, batches, unit_modules) -> tuple[dict[str, float], int]:
    """({unit: trace of the empirical Fisher (mean over batches of squared gradients)}, gradient passes)."""
    params = unit_parameters(model, unit_modules)
    sums = {u: 0.0 for u in params}
    passes = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        flat = [p for ps in params.values() for p in ps]
        grads = torch.autograd.grad(loss, flat)
        passes += 1
        i = 0
        for u, ps in params.items():
            for _ in ps:
                sums[u] += float(grads[i].double().pow(2).sum())
                i += 1
    return {u: s / max(passes, 1) for u, s in sums.items()}, passes


def second_order_score(trace: float, numel: int, sq_error: float) -> float:
    """HAWQ-V3's sensitivity: mean Hessian (or Fisher) diagonal times the squared quantization error."""
    return trace / max(numel, 1) * sq_error
