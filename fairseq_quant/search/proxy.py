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


def ctc_nll(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
            target_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """Summed CTC negative log-likelihood by the forward algorithm in plain autograd operations, so that it has a
    second derivative (torch's ``ctc_loss`` has none, and Hutchinson's estimator needs one). ``log_probs``
    [T, B, V]; ``targets`` [B, L] padded (only the first ``target_lengths`` count). Equal to
    ``F.ctc_loss(..., reduction="sum")``."""
    frames, bsz, _ = log_probs.shape
    labels = targets[:, : int(target_lengths.max())] if targets.numel() else targets
    ext = torch.full((bsz, 2 * labels.size(1) + 1), blank, dtype=torch.long, device=log_probs.device)
    ext[:, 1::2] = labels  # blank, y1, blank, y2, ..., blank
    states = ext.size(1)
    # a finite "log 0": logsumexp over -inf alone has a nan gradient
    neg_inf = torch.tensor(-1e30, dtype=log_probs.dtype, device=log_probs.device)
    # a label may follow the label two states back directly unless it repeats it
    skip = torch.zeros_like(ext, dtype=torch.bool)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    emit = log_probs.gather(2, ext.unsqueeze(0).expand(frames, -1, -1))  # [T, B, S]
    alpha = torch.full((bsz, states), -1e30, dtype=log_probs.dtype, device=log_probs.device)
    alpha = torch.cat([emit[0, :, :2], alpha[:, 2:]], dim=1)
    for t in range(1, frames):
        one = torch.cat([alpha.new_full((bsz, 1), -1e30), alpha[:, :-1]], dim=1)
        two = torch.cat([alpha.new_full((bsz, 2), -1e30), alpha[:, :-2]], dim=1)
        two = torch.where(skip, two, neg_inf)
        step = torch.logsumexp(torch.stack([alpha, one, two]), dim=0) + emit[t]
        alpha = torch.where((t < input_lengths).unsqueeze(1), step, alpha)
    last = (2 * target_lengths).unsqueeze(1)  # the final blank; the final label is one before it
    ends = torch.cat([alpha.gather(1, last), alpha.gather(1, (last - 1).clamp(min=0))], dim=1)
    ends[:, 1] = torch.where(target_lengths > 0, ends[:, 1], neg_inf)
    return -torch.logsumexp(ends, dim=1).sum()


def second_order_score(trace: float, numel: int, sq_error: float) -> float:
    """HAWQ-V3's sensitivity: mean Hessian (or Fisher) diagonal times the squared quantization error."""
    return trace / max(numel, 1) * sq_error
