"""Exact 1.5-entmax (Peters, Niculae & Martins 2019), the sparse attention map of scTab.

``entmax15(z) = argmax_{p in simplex} p.z + H_1.5(p)`` with Tsallis entropy
``H_1.5(p) = (1 - sum_j p_j^1.5) / 0.75``. The solution is ``p_j = [z_j / 2 - tau]_+^2`` with
the threshold ``tau`` making ``p`` sum to 1. ``tau`` is found exactly by the sort-based
algorithm: sort ``u = z / 2`` descending; for each support size ``k`` the candidate threshold
of the top ``k`` entries is ``tau_k = mean_k - sqrt((1 - ss_k) / k)`` (``mean_k`` and ``ss_k``
the mean and the sum of squared deviations of the top ``k``); the support is the largest ``k``
with ``tau_k <= u_(k)``.

- Numerical stability: ``u`` is shifted so that its maximum is 0; since ``tau >= max(u) - 1``,
  entries below ``-1`` can never be in the support, and clamping them to ``-2`` leaves ``tau``
  unchanged while keeping every running sum O(1) per entry (``-2``, not ``-1``: ties exactly
  at ``-1`` would pass the support test up to rounding when ``tau = -1``, i.e. when one entry
  dominates). Entries outside the support are exact zeros.
- Partial sorting (as the ``entmax`` package's ``k``): with a hint ``k``, only the ``k``
  largest entries are sorted (``torch.topk``); the prefix of the sorted row determines
  ``tau`` and the support exactly as long as the support is smaller than ``k``; otherwise
  the ``2k`` largest are tried, and so on, and rows are sorted fully once ``k`` would exceed
  half the row (a partial sort of 2,048 x 765 costs 15 to 20 ms, a full sort about 70 ms).
  The result does not depend on ``k`` (the same prefix sums; exact ties among the selected
  entries, which the two sorts order differently, are put in feature order).
- Backward (the Jacobian of 1.5-entmax): with ``s = sqrt(p)``,
  ``dz = s * g - s * (s . g) / sum(s)``; it is zero outside the support.

:func:`entmax15_sparse` returns the solution in compact form (per row, the values and feature
indices of the ``w`` largest entries, ``w`` the largest support in the batch) together with
TabNet's mask entropy ``sum_j -p_j log(p_j + eps)``, both differentiable, so that TabNet can
use the mask without touching its zeros. :func:`entmax15` is the dense map.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

ENTROPY_EPS = 1e-15
"""TabNet's epsilon inside the log of the mask entropy."""
_FLOOR = -2.0
"""Entries of the max-shifted, halved input are clamped to this floor (below ``tau``)."""


def _threshold_sorted(vals: Tensor) -> tuple[Tensor, Tensor]:
    """``tau`` (rows x 1) and support size (rows x 1) from rows sorted descending."""
    k = vals.shape[-1]
    rho = torch.arange(1, k + 1, device=vals.device, dtype=vals.dtype)
    mean = vals.cumsum(-1) / rho
    mean_sq = (vals * vals).cumsum(-1) / rho
    ss = rho * (mean_sq - mean * mean)
    tau = mean - torch.sqrt(((1.0 - ss) / rho).clamp(min=0.0))
    support = (tau <= vals).sum(dim=-1, keepdim=True)
    return tau.gather(-1, support - 1), support


def _solve(u: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sorted (clamped) values, their indices, ``tau`` and support of max-shifted ``u``."""
    d = u.shape[-1]
    while k is not None and 0 < k and 2 * k <= d:
        vals, idx = torch.topk(u, k, dim=-1)
        vals = vals.clamp(min=_FLOOR)
        tau, support = _threshold_sorted(vals)
        if support.numel() == 0 or int(support.max()) < k:
            return vals, idx, tau, support
        k *= 2  # a support as large as the hint: a prefix twice as long, then a full sort
    vals, idx = torch.sort(u, dim=-1, descending=True)
    vals = vals.clamp(min=_FLOOR)
    tau, support = _threshold_sorted(vals)
    return vals, idx, tau, support


def _ties_by_index(vals: Tensor, idx: Tensor, tau: Tensor) -> Tensor:
    """``idx`` with equal nonzero entries of each row ordered by feature index.

    A partial sort (``topk``) and a full sort break exact ties differently, and the order of
    the selected features is the order of a later sum (the masked Linear), so without this
    the rounding of a fit could depend on the sort hint. Only rows with a tie among their
    nonzero entries are touched (rare: equal float32 attention logits).
    """
    nonzero = vals > tau
    tied = (vals[:, 1:] == vals[:, :-1]) & nonzero[:, 1:]
    rows = tied.any(dim=-1).nonzero().flatten()
    if rows.numel() == 0:
        return idx
    v, i = vals[rows], idx[rows]
    run = torch.cat([v.new_zeros(len(rows), 1), (v[:, 1:] != v[:, :-1]).to(v.dtype)], dim=1)
    key = run.cumsum(dim=-1).long() * (int(idx.max()) + 1) + i
    idx = idx.clone()
    idx[rows] = i.gather(1, key.argsort(dim=-1))
    return idx


class Entmax15Sparse(Function):
    """1.5-entmax of 2-D ``z`` along its last dimension, in compact form, with its entropy.

    Outputs: ``p`` (rows x w, the nonzero probabilities first, then zeros; ``w`` the most
    nonzeros of a row), ``idx`` (rows x w, their feature indices), ``h`` (rows,
    ``sum -p log(p + eps)``) and ``support`` (rows x 1, the support size of the algorithm, at
    least the number of nonzeros).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, z: Tensor, k: int | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u = (z - z.amax(dim=-1, keepdim=True)) * 0.5
        vals, idx, tau, support = _solve(u, k)
        nonzero = (vals > tau).sum(dim=-1)  # sorted: the nonzeros come first
        w = max(int(nonzero.max()), 1) if nonzero.numel() else 0
        s = (vals[:, :w] - tau).clamp_(min=0.0)  # s = sqrt(p)
        idx = _ties_by_index(vals[:, :w], idx[:, :w], tau).contiguous()
        p = s * s
        h = -(p * torch.log(p + eps)).sum(dim=-1)
        ctx.save_for_backward(s, p, idx)
        ctx.d, ctx.eps = u.shape[-1], eps  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(idx, support)
        return p, idx, h, support

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, gp: Tensor | None, _gi: Tensor | None, gh: Tensor | None, _gs: Tensor
    ) -> tuple[Tensor, None, None]:
        s, p, idx = ctx.saved_tensors  # type: ignore[attr-defined]
        g = torch.zeros_like(p) if gp is None else gp
        if gh is not None:
            eps = ctx.eps  # type: ignore[attr-defined]
            g = g - gh.unsqueeze(-1) * (torch.log(p + eps) + p / (p + eps))
        gs = g * s
        gs = gs - s * (gs.sum(dim=-1, keepdim=True) / s.sum(dim=-1, keepdim=True))
        dz = gs.new_zeros(s.shape[0], ctx.d)  # type: ignore[attr-defined]
        return dz.scatter_(-1, idx, gs), None, None


def entmax15_sparse(
    z: Tensor, k: int | None = None, eps: float = ENTROPY_EPS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1.5-entmax of ``z`` (cells x features) in compact form; see :class:`Entmax15Sparse`.

    ``k``: partial-sort hint (the ``k`` largest entries are sorted first; exact whatever ``k``).
    Returns ``(p, idx, entropy, support)``; the dense map is ``zeros.scatter(1, idx, p)``.
    """
    if z.dim() != 2:
        raise ValueError(f"entmax15_sparse takes a 2-D tensor, got shape {tuple(z.shape)}")
    return Entmax15Sparse.apply(z, k, eps)


def to_dense(p: Tensor, idx: Tensor, d: int) -> Tensor:
    """The dense (rows x ``d``) form of a compact mask."""
    return p.new_zeros(p.shape[0], d).scatter(-1, idx, p)


def entmax15(z: Tensor, dim: int = -1, k: int | None = None) -> Tensor:
    """1.5-entmax of ``z`` along ``dim``: non-negative, sums to 1, exact zeros (sparse)."""
    if z.dim() == 0:
        raise ValueError("entmax15 needs at least one dimension")
    moved = z.movedim(dim, -1)
    shape = moved.shape
    flat = moved.reshape(-1, shape[-1])
    p, idx, _, _ = entmax15_sparse(flat, k)
    return to_dense(p, idx, shape[-1]).reshape(shape).movedim(-1, dim)


class Entmax15(torch.nn.Module):
    """Module wrapper of :func:`entmax15`."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, z: Tensor) -> Tensor:
        """1.5-entmax along ``self.dim``."""
        return entmax15(z, self.dim)
