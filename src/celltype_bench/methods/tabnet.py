"""TabNet (Arik & Pfister 2019) as scTab uses it: attentive feature selection with 1.5-entmax.

The network (defaults are scTab's: one decision step, ``n_d`` 128, ``n_a`` 64, 3 shared and 5
step-specific GLU layers, virtual batch 256):

- ``initial_bn``: BatchNorm1d on the input (log1p(CP10k) expression), full-batch statistics.
- GLU layer: ``Linear(bias=False) -> GhostBatchNorm -> GLU`` (``a * sigmoid(b)``).
- GLU block: GLU layers with residual connections scaled by ``sqrt(0.5)``; the first layer of
  the shared block has no residual (its input width differs).
- Feature transformer: the shared block (``n_shared`` layers whose ``Linear`` weights are
  shared by every transformer of the network) followed by a step-specific block
  (``n_independent`` layers).
- Attentive transformer: ``Linear(n_a -> n_features) -> GhostBatchNorm``, times the prior
  scales, then 1.5-entmax: a mask ``M`` on the simplex over the input features, with exact
  zeros.
- An initial splitter feature transformer turns the normalised input into the first
  attention input. Each decision step: ``M * x -> feature transformer -> [d | a]``; ``ReLU(d)``
  (``n_d`` wide) is summed over steps into the decision output, ``a`` (``n_a`` wide) feeds the
  next step's attention; priors are updated as ``prior * (relaxation - M)``.
- ``final``: ``Linear(n_d -> n_classes, bias=False)``: the logits.

Sparsity regulariser (TabNet's): the mean over cells of the mask entropy
``sum_j -M_j log(M_j + eps)``, averaged over steps, stored after every forward pass in
``last_sparsity_loss`` so a training loop can add ``lambda_sparse * last_sparsity_loss``.

Ghost batch normalisation: in training, the batch is split into ``ceil(n / vbs)``
consecutive virtual batches (``torch.chunk``, as TabNet) and each is normalised with its own
mean and variance, one batch-norm call per chunk, updating the running statistics chunk after
chunk (TabNet's loop). In evaluation the running statistics of the whole data are used.
Speed (the same function as pytorch-tabnet's network with the same weights, computed with
less work; tests/test_sctab.py compares the two):

- Sparse masks stay sparse: the attention mask comes out of 1.5-entmax in compact form (the
  selected features of each cell, found by a partial sort), its entropy is computed on those
  entries only, and when the masks select few features (at most ``n_features /
  sparse_input_ratio`` per cell) the step's first Linear sums the selected columns only
  (:class:`MaskedLinear`) instead of multiplying a mostly-zero dense matrix.
- Outputs nobody uses are not computed: the splitter's decision part (only its attention part
  feeds the attentive transformer) and the last step's attention part (no next step). The
  last GLU layer of those transformers computes only the kept columns (:class:`RowsLinear`:
  the rows of its ``Linear`` that make them, and their batch-norm channels): 2/3 and 1/3 of a
  layer at scTab's widths. Outputs and gradients are the whole layer's, bitwise (the input
  gradient is still the full product, rounded as autograd rounds it); the skipped channels'
  running statistics are never updated (:meth:`TabNet.skipped_channels`).

The input batch norm is torch's ``BatchNorm1d`` applied to the input, with autograd's
backward, as in pytorch-tabnet. Two cheaper forms of the same function were faster but
trained more slowly on the benchmark data (benchmarks/results/sctab_vs_pytorch_tabnet.md,
sctab_loop_variants.md): folded into the splitter's first Linear (``BN(x) @ W.T == x @ (W *
a).T + W @ c``), test macro F1 0.021 below pytorch-tabnet's over 44 seeds; and a custom
backward taking the batch norm's weight and bias gradients from ``dY.T @ x_hat``, the product
the Linear's weight gradient needs anyway (bitwise the same forward and running statistics,
gradients equal to about 1e-6 relative, about 7% faster per epoch), 0.035 below over 17
seeds. This form: 0.004 below over 48.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .entmax import entmax15_sparse, to_dense

SQRT_HALF = math.sqrt(0.5)


def _init_glu(layer: nn.Linear, fan_in: int, fan_out: int) -> None:
    """TabNet's initialisation of a GLU layer's Linear."""
    gain = math.sqrt((fan_in + fan_out) / math.sqrt(fan_in))
    nn.init.xavier_normal_(layer.weight, gain=gain)


def _init_non_glu(layer: nn.Linear, fan_in: int, fan_out: int) -> None:
    """TabNet's initialisation of the attention and final Linear layers."""
    gain = math.sqrt((fan_in + fan_out) / math.sqrt(4 * fan_in))
    nn.init.xavier_normal_(layer.weight, gain=gain)


class MaskedLinear(torch.autograd.Function):
    """``y = P @ W.T`` for a row-sparse ``P`` given compactly (values and column indices).

    Forward: an ``embedding_bag`` sum over each row's selected columns of ``W.T`` (work
    proportional to the selected entries). Backward: dense matrix products (faster on CPU than
    scattering per entry): ``dP = (dY @ W)[row, idx]``, ``dW = dY.T @ dense(P)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: Tensor, idx: Tensor, weight: Tensor
    ) -> Tensor:
        ctx.save_for_backward(values, idx, weight)
        table = weight.t().contiguous()
        return F.embedding_bag(idx, table, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None]:
        values, idx, weight = ctx.saved_tensors
        g_values = g_weight = None
        if ctx.needs_input_grad[0]:
            g_values = (grad @ weight).gather(1, idx)
        if ctx.needs_input_grad[2]:
            g_weight = grad.t() @ to_dense(values, idx, weight.shape[1])
        return g_values, None, g_weight


def masked_linear(values: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``dense(values, idx) @ weight.T`` without forming the dense matrix in the forward pass."""
    return MaskedLinear.apply(values, idx, weight)


def glu_rows(out_dim: int, keep: tuple[int, int]) -> Tensor:
    """Rows of a GLU layer's ``Linear`` (``2 * out_dim`` outputs: values, then gates) that
    produce the GLU output columns ``keep = (lo, hi)``."""
    lo, hi = keep
    return torch.cat([torch.arange(lo, hi), torch.arange(out_dim + lo, out_dim + hi)])


class RowsLinear(torch.autograd.Function):
    """``y = x @ W[rows].T`` for the rows of a GLU layer's ``Linear`` that make the output
    columns ``keep``: the forward and the weight gradient skip the other rows; the input
    gradient is the full product ``dY @ W`` with zeros in the skipped columns of ``dY``, as
    autograd computes it for the whole layer (so it is rounded the same, bitwise)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, rows: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, weight, rows)
        return F.linear(x, weight.index_select(0, rows))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rows = ctx.saved_tensors
        g_x = g_weight = None
        if ctx.needs_input_grad[0]:
            full = grad.new_zeros(grad.shape[0], weight.shape[0])
            full.index_copy_(1, rows, grad)
            g_x = full @ weight
        if ctx.needs_input_grad[1]:
            g_weight = weight.new_zeros(weight.shape).index_copy_(0, rows, grad.t() @ x)
        return g_x, g_weight, None


class GhostBatchNorm(nn.BatchNorm1d):
    """Ghost batch normalisation (Hoffer et al. 2017): per-virtual-batch statistics.

    Training: the batch is split into ``ceil(n / virtual_batch_size)`` chunks
    (``torch.chunk``, as pytorch-tabnet's and scTab's ``GBN``) normalised separately; the
    running statistics are updated chunk after chunk (momentum ``momentum`` each). Evaluation:
    the running statistics.

    An earlier version normalised all chunks in one call on an interleaved row layout: the
    same function, but it trained more slowly in the early epochs on the benchmark data (a
    float32 rounding effect, benchmarks/results/sctab_same_loop.md), and a training step was
    only about 3% faster (8 alternating repeats, within the noise).
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        self.virtual_batch_size = int(virtual_batch_size)

    def n_chunks(self, n: int) -> int:
        """Number of virtual batches of a batch of ``n`` cells."""
        return max(-(-n // self.virtual_batch_size), 1)

    def forward(self, x: Tensor, channels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Normalise ``x`` (cells x features).

        ``channels``: ``x`` holds only these features (an index into this layer's features);
        they are normalised with their own weights and statistics, exactly as in a call on all
        features, and only their running statistics are updated.
        """
        mean, var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        if channels is not None:
            mean, var = mean.index_select(0, channels), var.index_select(0, channels)
            weight, bias = weight.index_select(0, channels), bias.index_select(0, channels)
        if not self.training:
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        if channels is None and self.n_chunks(x.shape[0]) == 1:
            return super().forward(x)
        k = self.n_chunks(x.shape[0])
        momentum = float(self.momentum)
        self.num_batches_tracked.add_(k)
        chunks = [
            F.batch_norm(c, mean, var, weight, bias, True, momentum, self.eps)
            for c in x.chunk(k, 0)
        ]
        if channels is not None:
            self.running_mean.index_copy_(0, channels, mean)
            self.running_var.index_copy_(0, channels, var)
        return chunks[0] if k == 1 else torch.cat(chunks, dim=0)


class GLULayer(nn.Module):
    """``Linear(bias=False) -> GhostBatchNorm -> GLU``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        fc: nn.Linear | None = None,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        if fc is None:
            fc = nn.Linear(in_dim, 2 * out_dim, bias=False)
            _init_glu(fc, in_dim, 2 * out_dim)
        self.fc = fc
        self.bn = GhostBatchNorm(2 * out_dim, virtual_batch_size, momentum)

    def forward(
        self, x: Tensor, projected: bool = False, keep: tuple[int, int] | None = None
    ) -> Tensor:
        """GLU of the normalised projection (``projected``: ``x`` is already ``fc(x)``).

        ``keep = (lo, hi)``: only the output columns ``lo:hi`` are computed (the others are not
        used by the caller), each exactly as in the whole layer's output.
        """
        if keep is None:
            return F.glu(self.bn(x if projected else self.fc(x)), dim=-1)
        rows = glu_rows(self.out_dim, keep).to(x.device)
        h = x.index_select(1, rows) if projected else RowsLinear.apply(x, self.fc.weight, rows)
        return F.glu(self.bn(h, rows), dim=-1)


class GLUBlock(nn.Module):
    """GLU layers with ``sqrt(0.5)``-scaled residual connections (none on a ``first`` layer)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_glu: int,
        first: bool = False,
        shared: nn.ModuleList | None = None,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
    ) -> None:
        super().__init__()
        self.first = first
        self.layers = nn.ModuleList(
            GLULayer(
                in_dim if i == 0 else out_dim,
                out_dim,
                fc=None if shared is None else shared[i],
                virtual_batch_size=virtual_batch_size,
                momentum=momentum,
            )
            for i in range(n_glu)
        )

    def forward(
        self, x: Tensor, projected: bool = False, keep: tuple[int, int] | None = None
    ) -> Tensor:
        """Apply the layers; residual ``(x + glu(x)) * sqrt(0.5)`` after a first layer.

        ``projected`` (only for a ``first`` block): ``x`` is the first layer's ``fc(x)``.
        ``keep = (lo, hi)``: the last layer computes only the output columns ``lo:hi``.
        """
        if projected and not self.first:
            raise ValueError("only a first GLU block takes a projected input")
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            k = keep if i == last else None
            if i == 0 and self.first:
                x = layer(x, projected, k)
            else:
                res = x if k is None else x[:, k[0] : k[1]]
                x = torch.add(res, layer(x, keep=k)).mul_(SQRT_HALF)
        return x


class FeatureTransformer(nn.Module):
    """Shared GLU block (weights shared across steps) followed by a step-specific block."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        shared: nn.ModuleList | None,
        n_independent: int,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
    ) -> None:
        super().__init__()
        kw = {"virtual_batch_size": virtual_batch_size, "momentum": momentum}
        self.shared = (
            None
            if shared is None or len(shared) == 0
            else GLUBlock(in_dim, out_dim, len(shared), first=True, shared=shared, **kw)
        )
        first = self.shared is None
        self.specific = (
            None
            if n_independent == 0
            else GLUBlock(in_dim if first else out_dim, out_dim, n_independent, first, **kw)
        )

    @property
    def last_layer(self) -> GLULayer:
        """The GLU layer that makes the transformer's output."""
        block = self.specific if self.specific is not None else self.shared
        assert block is not None
        layer = block.layers[-1]
        assert isinstance(layer, GLULayer)
        return layer

    @property
    def first_fc(self) -> nn.Linear:
        """The Linear layer that sees the transformer's input."""
        block = self.shared if self.shared is not None else self.specific
        assert block is not None
        fc = block.layers[0].fc
        assert isinstance(fc, nn.Linear)
        return fc

    def forward(
        self, x: Tensor, projected: bool = False, keep: tuple[int, int] | None = None
    ) -> Tensor:
        """Shared block, then the specific block (``projected``: ``x`` is ``first_fc(x)``).

        ``keep = (lo, hi)``: only the output columns ``lo:hi`` (the last layer skips the rest).
        """
        if self.shared is not None:
            x = self.shared(x, projected, keep if self.specific is None else None)
            projected = False
        if self.specific is not None:
            x = self.specific(x, projected, keep)
        return x


class AttentiveTransformer(nn.Module):
    """``Linear(n_a -> n_features) -> GhostBatchNorm -> * prior -> 1.5-entmax``: the mask.

    Returns the mask in compact form ``(p, idx, entropy)`` (see
    :func:`celltype_bench.methods.entmax.entmax15_sparse`). The buffer ``k_hint`` remembers
    how many entries to partial-sort next time, from the largest support of the last training
    batch (evaluation passes, whose masks are sparser, leave it alone: a hint set by the
    validation pass was too small for the next training batch); it only affects speed, never
    the mask.
    """

    def __init__(
        self,
        n_a: int,
        n_features: int,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.fc = nn.Linear(n_a, n_features, bias=False)
        _init_non_glu(self.fc, n_a, n_features)
        self.bn = GhostBatchNorm(n_features, virtual_batch_size, momentum)
        self.register_buffer("k_hint", torch.zeros((), dtype=torch.long))

    def forward(self, att: Tensor, prior: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The attention mask of every cell, compact: ``(p, idx, entropy)``."""
        z = self.bn(self.fc(att))
        if prior is not None:
            z = z * prior
        hint = int(self.k_hint)
        p, idx, entropy, support = entmax15_sparse(z, hint or None)
        if support.numel() and self.training:
            want = -(-(int(support.max()) * 5 // 4 + 8) // 8) * 8
            self.k_hint.fill_(want if 2 * want < self.n_features else 0)
        return p, idx, entropy


class TabNet(nn.Module):
    """TabNet classifier returning logits; see the module docstring for the architecture."""

    sparse_input_ratio: float = 6.0
    """Masked inputs with at most ``n_features / sparse_input_ratio`` nonzeros per cell (the
    largest support in the batch) enter the step's first Linear as a sparse product
    (``embedding_bag`` over the selected features); denser ones as a dense matrix product."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        n_d: int = 128,
        n_a: int = 64,
        n_steps: int = 1,
        n_shared: int = 3,
        n_independent: int = 5,
        virtual_batch_size: int = 256,
        momentum: float = 0.02,
        relaxation: float = 1.3,
        epsilon: float = 1e-15,
        input_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if n_shared < 0 or n_independent < 0 or n_shared + n_independent == 0:
            raise ValueError("n_shared and n_independent must be >= 0 and not both 0")
        self.n_features, self.n_classes = n_features, n_classes
        self.n_d, self.n_a, self.n_steps = n_d, n_a, n_steps
        self.virtual_batch_size = int(virtual_batch_size)
        self.relaxation, self.epsilon = relaxation, epsilon
        width = n_d + n_a
        self.initial_bn = nn.BatchNorm1d(n_features, momentum=input_momentum)
        shared = nn.ModuleList()
        for i in range(n_shared):
            fan_in = n_features if i == 0 else width
            fc = nn.Linear(fan_in, 2 * width, bias=False)
            _init_glu(fc, fan_in, 2 * width)
            shared.append(fc)
        kw = {"virtual_batch_size": virtual_batch_size, "momentum": momentum}
        shared_or_none = shared if n_shared > 0 else None
        self.initial_splitter = FeatureTransformer(
            n_features, width, shared_or_none, n_independent, **kw
        )
        self.feat_transformers = nn.ModuleList(
            FeatureTransformer(n_features, width, shared_or_none, n_independent, **kw)
            for _ in range(n_steps)
        )
        self.att_transformers = nn.ModuleList(
            AttentiveTransformer(n_a, n_features, **kw) for _ in range(n_steps)
        )
        self.final = nn.Linear(n_d, n_classes, bias=False)
        _init_non_glu(self.final, n_d, n_classes)
        self.last_sparsity_loss: Tensor = torch.zeros(())

    def n_parameters(self, trainable_only: bool = True) -> int:
        """Number of parameters (the shared ``Linear`` weights counted once).

        With scTab's defaults on 19,331 genes and 164 types: about 9.7 million; the count
        grows about linearly with ``n_d + n_a`` (the first shared layer, ``n_features x 2(n_d +
        n_a)``, and the attention layers, ``n_a x n_features``, dominate).
        """
        return int(
            sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        )

    def skipped_channels(self) -> dict[str, Tensor]:
        """Batch norms whose channels are not computed, by module name: the channels (feature
        indices) of the outputs no later layer uses (the splitter's decision part, the last
        step's attention part). Their running statistics keep their initial values."""
        width = self.n_d + self.n_a
        out: dict[str, Tensor] = {}
        names = {id(m): n for n, m in self.named_modules()}
        for ft, keep in (
            (self.initial_splitter, (self.n_d, width)),
            (self.feat_transformers[-1], (0, self.n_d)),
        ):
            bn = ft.last_layer.bn
            computed = torch.zeros(bn.num_features, dtype=torch.bool)
            computed[glu_rows(width, keep)] = True
            out[names[id(bn)]] = (~computed).nonzero().flatten()
        return out

    def _step_input(
        self,
        ft: FeatureTransformer,
        x: Tensor,
        p: Tensor,
        idx: Tensor,
        keep: tuple[int, int] | None = None,
    ) -> Tensor:
        """The step's feature transformer applied to the masked normalised input ``M * x``."""
        if p.shape[1] * self.sparse_input_ratio <= self.n_features:
            proj = masked_linear(p * x.gather(1, idx), idx, ft.first_fc.weight)
            return ft(proj, projected=True, keep=keep)
        return ft(to_dense(p, idx, self.n_features) * x, keep=keep)

    def _run(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]:
        """Logits, compact step masks and the sparsity loss."""
        if self.training and x.shape[0] < 2:
            raise ValueError("TabNet needs at least 2 cells per training batch")
        x = self.initial_bn(x)
        width = self.n_d + self.n_a
        att = self.initial_splitter(x, keep=(self.n_d, width))  # its decision part is unused
        prior: Tensor | None = None
        decision: Tensor | None = None
        masks: list[tuple[Tensor, Tensor]] = []
        sparsity = x.new_zeros(())
        for step in range(self.n_steps):
            p, idx, entropy = self.att_transformers[step](att, prior)
            masks.append((p, idx))
            sparsity = sparsity + entropy.mean()
            if step + 1 < self.n_steps:
                m = to_dense(p, idx, self.n_features)
                prior = (self.relaxation - m) if prior is None else prior * (self.relaxation - m)
            last = step + 1 == self.n_steps  # the last step's attention part is unused
            keep = (0, self.n_d) if last else None
            out = self._step_input(self.feat_transformers[step], x, p, idx, keep)
            d = F.relu(out[:, : self.n_d])
            decision = d if decision is None else decision + d
            att = out[:, self.n_d :]
        assert decision is not None
        return self.final(decision), masks, sparsity / self.n_steps

    def forward(self, x: Tensor) -> Tensor:
        """Logits (cells x classes); sets ``last_sparsity_loss`` (mask entropy)."""
        logits, _, sparsity = self._run(x)
        self.last_sparsity_loss = sparsity
        return logits

    def forward_masks(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and the dense attention mask of every step (in the current mode)."""
        logits, compact, sparsity = self._run(x)
        self.last_sparsity_loss = sparsity
        return logits, [to_dense(p, idx, self.n_features) for p, idx in compact]

    @torch.no_grad()
    def masks(self, x: Tensor) -> Tensor:
        """Attention masks in eval mode (cells x features, rows on the simplex).

        With several steps: the mean of the step masks.
        """
        was_training = self.training
        self.eval()
        try:
            _, masks = self.forward_masks(x)
        finally:
            self.train(was_training)
        return masks[0] if len(masks) == 1 else torch.stack(masks).mean(0)


def pytorch_tabnet_key(key: str) -> str:
    """pytorch-tabnet's ``TabNet`` state-dict key of one of our :class:`TabNet`'s keys (for
    copying weights between the two in equivalence checks)."""
    if key.startswith("final."):
        return "tabnet.final_mapping." + key[len("final.") :]
    out = key.replace(".layers.", ".glu_layers.").replace(".specific.", ".specifics.")
    if not key.startswith("initial_bn."):
        out = out.replace(".bn.", ".bn.bn.")
    return "tabnet.encoder." + out
