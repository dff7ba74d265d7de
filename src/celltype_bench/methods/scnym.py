"""scNym (Kimmel & Kelley 2021, Genome Research), reimplemented from the paper and the
released code (calico/scnym, ``api.CONFIGS``, ``losses.MixMatchLoss``, ``model.DANN``).

Input. scNym trains on log1p(CPM). The benchmark hands log1p(CP10k); the network's first
step maps it exactly: ``log1p(expm1(x) * target_sum / 1e4)`` (zeros stay zeros), so
``target_sum=1e6`` gives log1p(CPM) for training, validation, unlabeled and test cells alike.

Network (:class:`ScNymNet`): genes -> 256 -> 256 -> classes; each hidden layer is Linear,
BatchNorm1d, Dropout(0.5), ReLU (scNym's order); the 256-d output of the second hidden layer
is the embedding the domain adversary sees.

Training step on a labeled batch ``(xl, yl)`` and an unlabeled batch ``xu`` of the same size
(MixMatch, Berthelot et al. 2019, as scNym runs it):

1. pseudolabels: the current model in eval mode (scNym's default teacher: a copy of the model,
   no mean teacher) predicts ``n_augmentations`` (1, scNym's setting) augmented copies of
   ``xu``; the mean probability is the guess, sharpened with temperature ``T = 0.5``
   (``q^(1/T) / sum q^(1/T)``). MixMatch and scNym's ``MixMatchLoss`` augment here; scNym's
   shipped configs switch it off (``augment_pseudolabels=False`` reproduces them). With ``pseudolabel_min_confidence`` (scNym's
   ``new_identity_discovery`` preset: 0.9) only cells whose guess reaches it enter MixUp and
   the consistency loss (and, as in that preset, the adversary);
2. augmentation ``log1p_drop``: expm1 to CPM, each entry dropped with probability 0.1, the
   cell renormalised to its library size before the dropout, log1p (:func:`input_dropout`).
   scNym renormalises to 1e6, which is the same when the CPM of the model's genes sum to 1e6
   and keeps augmented cells on the scale of the others when they do not (gene subsets);
3. MixUp over the concatenation [confident unlabeled, augmented labeled]: per cell
   ``lambda ~ Beta(0.3, 0.3)``, ``lambda = max(lambda, 1 - lambda)`` (the dominant partner
   keeps its identity), a random partner from the whole concatenation; inputs AND targets
   (one-hot labels / sharpened pseudolabels) are mixed with the same lambda (:func:`mixup`);
4. supervised loss: cross-entropy with the mixed (soft) targets on the labeled part;
   unsupervised loss: squared error between the predicted probabilities of the mixed unlabeled
   part and its mixed pseudolabels, summed over classes, averaged over the unlabeled batch
   (cells below the confidence threshold pass through the network unmixed, for BatchNorm, with
   zero loss);
5. domain adversary (:class:`DomainAdversary`, scNym's DANN): Linear(256, 256), ReLU,
   Linear(256, n_domains) on the embedding of [augmented labeled, unlabeled] behind a gradient
   reversal layer (:class:`GradReverse`: identity forward, gradient times ``-weight``
   backward). Its cross-entropy enters the loss unweighted: the adversary itself learns at
   full strength, while the encoder receives its reversed gradient scaled by the ramped
   weight (scNym's ``DANLoss``). Domains: ``adversary_domains='query'`` = training vs.
   unlabeled (each value of the unlabeled ``obs['domain']`` is its own domain: the test cells
   ``query`` and every extra unlabeled dataset); ``'batch'`` = the ``obs['batch']`` values of
   the training and unlabeled cells (scNym's ``domain_groupby``);
6. loss = supervised + w_ssl(epoch) * unsupervised + adversary. scNym's schedules: w_ssl rises
   LINEARLY from 0 to ``ssl_max_weight`` (1) over ``ssl_ramp_epochs`` (100) (``ICLWeight``
   with ``sigmoid=False``, the default of its config); the reversal weight follows scNym's
   sigmoid ramp ``w_max * exp(-5 (1 - t/T)^2)`` to ``dan_max_weight`` (0.1) over
   ``dan_ramp_epochs`` (20). Epochs count from 0 in the schedules, as in scNym.

Optimiser: Adadelta (lr 1.0, weight decay 1e-4) over classifier and adversary, batch 256,
100 epochs. Model selection: the best validation macro F1 (``selection_metric``; scNym used the
validation loss), counted only from ``min_epochs`` on (scNym: ``max(epochs // 20,
ssl_ramp_epochs // 5)``, at most ``epochs - 1``), early stopping after ``patience`` (40)
epochs without gain; the best weights are restored.

Unlabeled batches: every labeled batch is paired with as many unlabeled cells, taken from a
stream of consecutive random permutations of the unlabeled cells (scNym's endlessly repeated
shuffled loader, without its ``drop_last``), so a query of one cell, or fewer cells than a
batch, works (cells repeat) and never stalls. Without unlabeled cells the fit is supervised.

Presets: ``scnym`` (MixMatch + adversary), ``scnym_no_adversary`` (scNym's ``no_dan``),
``scnym_supervised`` (scNym's supervised trainer: plain cross-entropy, no augmentation, no
MixUp, no adversary; ``uses_unlabeled = False``).

Balancing switches: ``class_weighted`` (scNym's ``weighted_classes``: per-class weights
1/frequency normalised to a minimum of 1, applied per sample as ``max_c(w_c * target_c)``)
and ``weighted_sampling`` (scNym's ``balanced_classes``: draws with replacement, probability
1/class size, as many as cells). Both off by default, as in scNym.

Determinism and resume: batch order, unlabeled stream, MixUp lambdas and partners come from
``numpy.random.default_rng([seed, epoch])``; dropout masks from the torch seed
``epoch_seed(seed, epoch)``; augmentation masks from a generator seeded with
``epoch_seed(seed + 1, epoch)``. With ``checkpoint_dir`` the full state (network, adversary,
optimiser, best state, history) is saved after every epoch and a killed fit resumes to the same
result.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, ClassVar, Self

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from ..balancing import class_weights, epoch_indices
from ..errors import InputError
from ..training import (
    Checkpoint,
    epoch_seed,
    iterate_minibatches,
    predict_proba_torch,
    seed_everything,
)
from .base import TorchMethod
from .registry import register
from .scbalance import MaskDropout

__all__ = [
    "DomainAdversary",
    "GradReverse",
    "ScNym",
    "ScNymNet",
    "ScNymNoAdversary",
    "ScNymSupervised",
    "domain_labels",
    "grad_reverse",
    "input_dropout",
    "mixup",
    "ramp_weight",
    "scnym_class_weights",
    "sharpen",
    "soft_cross_entropy",
    "step_losses",
    "unlabeled_stream",
]

PROJECT_TARGET_SUM = 1e4  # X is log1p(counts scaled to 10,000 per cell)
HIDDEN = 256
DROPOUT = 0.5
TRAINING_DOMAIN = "training"
QUERY_DOMAIN = "query"


# ---------------------------------------------------------------------------- building blocks
def rescale_log1p(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``log1p(expm1(x) * factor)``: log1p of one library-size scale to another (exact)."""
    if factor == 1.0:
        return x
    return torch.log1p(torch.expm1(x) * factor)


class GradReverse(torch.autograd.Function):
    """Gradient reversal: identity forward; backward multiplies the gradient by ``-weight``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = float(weight)
        return x.view_as(x) * 1.0  # a new node, so autograd calls backward

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * (-ctx.weight), None


def grad_reverse(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Apply :class:`GradReverse` with scale ``weight``."""
    return GradReverse.apply(x, weight)


class ScNymNet(nn.Module):
    """genes -> 256 -> 256 -> classes (Linear, BatchNorm1d, Dropout, ReLU per hidden layer).

    ``forward`` takes the benchmark's log1p(CP10k) and converts it to scNym's input
    (:meth:`to_model_input`); :meth:`forward_model` takes the converted input.
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        hidden: int = HIDDEN,
        dropout: float = DROPOUT,
        input_factor: float = 100.0,
    ) -> None:
        super().__init__()
        self.input_factor = float(input_factor)
        self.n_hidden = int(hidden)
        self.embed = nn.Sequential(
            nn.Linear(n_genes, hidden),
            nn.BatchNorm1d(hidden),
            MaskDropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            MaskDropout(dropout),
            nn.ReLU(),
        )
        self.classif = nn.Linear(hidden, n_classes)

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """log1p(CP10k) -> log1p(target_sum-normalised counts), scNym's input."""
        return rescale_log1p(x, self.input_factor)

    def forward_model(
        self, x: torch.Tensor, return_embed: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (and the 256-d embedding) for input already in scNym's scale."""
        z = self.embed(x)
        logits = self.classif(z)
        return (logits, z) if return_embed else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_model(self.to_model_input(x))


class DomainAdversary(nn.Module):
    """scNym's DANN head: Linear(h, h), ReLU, Linear(h, n_domains) behind gradient reversal."""

    def __init__(self, n_hidden: int, n_domains: int) -> None:
        super().__init__()
        self.domain_clf = nn.Sequential(
            nn.Linear(n_hidden, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_domains)
        )

    def forward(self, embedding: torch.Tensor, weight: float) -> torch.Tensor:
        """Domain logits; the gradient reaching ``embedding`` is reversed and scaled."""
        return self.domain_clf(grad_reverse(embedding, weight))


def input_dropout(
    x: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """scNym's ``log1p_drop`` augmentation on log1p-normalised input ``x``.

    expm1 back to normalised counts, each entry zeroed with probability ``p``, every cell
    rescaled to its library size before the dropout, log1p. A cell that loses every count
    stays all-zero.
    """
    if p <= 0.0:
        return x
    counts = torch.expm1(x)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= p
    dropped = counts * keep
    before = counts.sum(dim=1, keepdim=True)
    after = dropped.sum(dim=1, keepdim=True)
    scale = torch.where(after > 0, before / after.clamp_min(1e-30), torch.zeros_like(after))
    return torch.log1p(dropped * scale)


def sharpen(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch sharpening ``q^(1/T) / sum_j q_j^(1/T)`` (T = 0: one-hot argmax)."""
    if temperature == 0.0:
        return F.one_hot(q.argmax(dim=1), num_classes=q.shape[1]).to(q.dtype)
    if temperature == 1.0:
        return q
    s = q.pow(1.0 / temperature)
    return s / s.sum(dim=1, keepdim=True)


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """MixUp with the dominant observation kept (scNym's ``keep_dominant_obs``).

    Per row ``lambda ~ Beta(alpha, alpha)``, ``lambda = max(lambda, 1 - lambda)``, a random
    partner ``perm[i]``: ``x_i' = lambda x_i + (1 - lambda) x_perm[i]``, same for ``y``.
    Returns (mixed x, mixed y, lambda (n, 1), perm). ``alpha == 0`` returns the inputs.
    """
    n = x.shape[0]
    if alpha <= 0.0 or n == 0:
        return x, y, torch.ones((n, 1), dtype=x.dtype, device=x.device), np.arange(n)
    lam = rng.beta(alpha, alpha, size=n)
    lam = np.maximum(lam, 1.0 - lam)
    perm = rng.permutation(n)
    lam_t = torch.as_tensor(lam, dtype=x.dtype, device=x.device).reshape(-1, 1)
    idx = torch.as_tensor(perm, device=x.device)
    mixed_x = lam_t * x + (1.0 - lam_t) * x[idx]
    mixed_y = lam_t.to(y.dtype) * y + (1.0 - lam_t.to(y.dtype)) * y[idx]
    return mixed_x, mixed_y, lam_t, perm


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy with soft targets; with ``class_weight`` each sample is weighted by
    ``max_c(w_c * target_c)`` (scNym's ``cross_entropy``)."""
    per = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    if class_weight is not None:
        per = per * (class_weight.reshape(1, -1) * target).max(dim=1).values
    return per.mean()


def scnym_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scNym's ``get_class_weight``: 1 / class frequency, normalised to a minimum of 1."""
    w = class_weights(y, n_classes)
    positive = w[w > 0]
    return w / positive.min() if positive.size else w


def ramp_weight(epoch: int, ramp_epochs: int, max_weight: float, kind: str = "linear") -> float:
    """scNym's ``ICLWeight`` (no burn-in) at 0-based ``epoch``.

    ``'linear'``: ``max * epoch / ramp``; ``'sigmoid'``: ``max * exp(-5 (1 - epoch/ramp)^2)``;
    ``max`` from ``epoch >= ramp`` on.
    """
    if ramp_epochs <= 0 or epoch >= ramp_epochs:
        return float(max_weight)
    t = max(epoch, 0) / ramp_epochs
    if kind == "sigmoid":
        return float(max_weight * math.exp(-5.0 * (t - 1.0) ** 2))
    if kind == "linear":
        return float(max_weight * t)
    raise ValueError(f"unknown ramp '{kind}'")


def unlabeled_stream(n_unlabeled: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` unlabeled indices: consecutive random permutations of all cells (every cell
    used equally often; a query smaller than a batch repeats its cells)."""
    if n_unlabeled < 1:
        raise ValueError("no unlabeled cells")
    reps = max(1, -(-int(length) // int(n_unlabeled)))
    perms = np.argsort(rng.random((reps, n_unlabeled)), axis=1, kind="stable")
    return perms.ravel()[: int(length)].astype(np.int64)


def _values(obs: pd.DataFrame | None, column: str, n: int, fallback: str) -> np.ndarray:
    """``obs[column]`` as strings (missing values -> ``fallback``); all ``fallback`` if absent."""
    if obs is None or column not in obs.columns:
        return np.full(n, fallback, dtype=object)
    s = obs[column]
    out = s.astype(object).to_numpy().copy()
    missing = pd.isna(s).to_numpy()
    out[missing] = fallback
    return np.array([str(v) for v in out], dtype=object)


def domain_labels(
    n_train: int,
    train_obs: pd.DataFrame | None,
    n_unlabeled: int,
    unlabeled_obs: pd.DataFrame | None,
    mode: str = "query",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer domain of each training and unlabeled cell, and the domain names.

    ``'query'``: every training cell is domain ``training``; unlabeled cells take their
    ``obs['domain']`` value (``query`` for the test cells, a dataset name for extra data) or
    ``query``. ``'batch'``: the ``obs['batch']`` values of both sides (missing -> the
    ``'query'`` labels).
    """
    if mode == "query":
        left = np.full(n_train, TRAINING_DOMAIN, dtype=object)
        right = _values(unlabeled_obs, "domain", n_unlabeled, QUERY_DOMAIN)
    elif mode == "batch":
        left = _values(train_obs, "batch", n_train, TRAINING_DOMAIN)
        right = _values(unlabeled_obs, "batch", n_unlabeled, QUERY_DOMAIN)
    else:
        raise InputError(
            f"unknown adversary_domains '{mode}'",
            field="adversary_domains",
            fix="use 'query' (training vs unlabeled) or 'batch' (obs['batch'])",
        )
    names = sorted(set(left.tolist()) | set(right.tolist()))
    code = {d: i for i, d in enumerate(names)}
    return (
        np.array([code[d] for d in left], dtype=np.int64),
        np.array([code[d] for d in right], dtype=np.int64),
        names,
    )


def mixmatch_losses(
    net: ScNymNet,
    xl: torch.Tensor,
    yl: torch.Tensor,
    xu: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    n_augmentations: int,
    augment_pseudolabels: bool,
    p_drop: float,
    min_confidence: float | None,
    rng: np.random.Generator,
    generator: torch.Generator | None,
    class_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One MixMatch step as in scNym's ``MixMatchLoss`` (inputs in scNym's scale).

    Returns ``sup`` (soft CE on the mixed labeled part), ``unsup`` (per-cell summed squared
    error on the mixed unlabeled part, averaged over the unlabeled batch), ``labeled_input``
    (the augmented labeled batch, which scNym's adversary sees), ``confident`` (bool per
    unlabeled cell) and ``pseudolabels`` (sharpened).
    """
    was_training = net.training
    net.eval()
    with torch.no_grad():
        guesses = []
        for _ in range(max(1, n_augmentations)):
            xa = input_dropout(xu, p_drop, generator) if augment_pseudolabels else xu
            guesses.append(torch.softmax(net.forward_model(xa), dim=1))
        guess = torch.stack(guesses).mean(dim=0)
    net.train(was_training)
    if min_confidence is None:
        confident = torch.ones(guess.shape[0], dtype=torch.bool, device=guess.device)
    else:
        confident = guess.max(dim=1).values >= min_confidence
    q = sharpen(guess, temperature).detach()
    xl_aug = input_dropout(xl, p_drop, generator)
    n_conf = int(confident.sum())
    cat_x = torch.cat([xu[confident], xl_aug])
    cat_y = torch.cat([q[confident], yl])
    mixed_x, mixed_y, _, _ = mixup(cat_x, cat_y, alpha, rng)
    u_in = torch.cat([mixed_x[:n_conf], xu[~confident]])
    u_target = torch.cat([mixed_y[:n_conf], q[~confident]])
    u_prob = torch.softmax(net.forward_model(u_in), dim=1)
    l_logits = net.forward_model(mixed_x[n_conf:])
    per_cell = ((u_prob - u_target) ** 2).sum(dim=1)
    mask = torch.zeros_like(per_cell)
    mask[:n_conf] = 1.0
    return {
        "sup": soft_cross_entropy(l_logits, mixed_y[n_conf:], class_weight),
        "unsup": (per_cell * mask).mean(),
        "labeled_input": xl_aug,
        "confident": confident,
        "pseudolabels": q,
    }


def step_losses(
    net: ScNymNet,
    adversary: DomainAdversary | None,
    xl: torch.Tensor,
    yl: torch.Tensor,
    dl: torch.Tensor,
    xu: torch.Tensor | None,
    du: torch.Tensor | None,
    *,
    params: dict[str, Any],
    ssl: bool,
    w_ssl: float,
    w_dan: float,
    rng: np.random.Generator,
    generator: torch.Generator | None,
    class_weight: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The losses of one training step (inputs in scNym's scale, one-hot ``yl``).

    ``loss = sup + w_ssl * unsup + dan``: MixMatch's supervised and consistency terms (or
    plain cross-entropy without ``ssl``) and the adversary's domain cross-entropy on the
    embedding of [augmented labeled, unlabeled] behind gradient reversal scaled by ``w_dan``
    (``adversary=None``: no adversary). Also returns ``confident`` (None without ``ssl``).
    """
    p = params
    zero = torch.zeros((), device=xl.device)
    confident = None
    xl_dan = xl
    if ssl:
        assert xu is not None
        out = mixmatch_losses(
            net,
            xl,
            yl,
            xu,
            temperature=p["sharpen_temperature"],
            alpha=p["mixup_alpha"],
            n_augmentations=p["n_augmentations"],
            augment_pseudolabels=p["augment_pseudolabels"],
            p_drop=p["input_dropout"],
            min_confidence=p["pseudolabel_min_confidence"],
            rng=rng,
            generator=generator,
            class_weight=class_weight,
        )
        sup, unsup = out["sup"], out["unsup"]
        xl_dan = out["labeled_input"]
        confident = out["confident"]
    else:
        sup = soft_cross_entropy(net.forward_model(xl), yl, class_weight)
        unsup = zero
    dan = zero
    if adversary is not None:
        assert xu is not None and du is not None
        xu_dan, du_dan = xu, du
        if confident is not None and p["pseudolabel_min_confidence"] is not None:
            xu_dan, du_dan = xu[confident], du[confident]
        _, emb = net.forward_model(torch.cat([xl_dan, xu_dan]), return_embed=True)
        dan = F.cross_entropy(adversary(emb, w_dan), torch.cat([dl, du_dan]))
    return {
        "loss": sup + w_ssl * unsup + dan,
        "sup": sup,
        "unsup": unsup,
        "dan": dan,
        "confident": confident,
    }


def _cpu_state(obj: Any) -> Any:
    def to_cpu(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, dict):
            return {k: to_cpu(x) for k, x in v.items()}
        if isinstance(v, list):
            return [to_cpu(x) for x in v]
        return v

    return to_cpu(obj.state_dict())


# ---------------------------------------------------------------------------- the method
@register("scnym")
class ScNym(TorchMethod):
    """scNym: MixMatch semi-supervision + domain adversary on a 256-256 network."""

    uses_unlabeled = True
    # the registry name of the same network trained without unlabeled cells (the gain table,
    # celltype_bench.unlabeled_gain, reports this method's macro F1 minus the control's)
    supervised_control: ClassVar[str | None] = "scnym_supervised"
    native_balancing = "none"
    default_params: ClassVar[dict[str, Any]] = {
        "epochs": 100,
        "batch_size": 256,
        "lr": 1.0,
        "weight_decay": 1e-4,
        "patience": 40,
        "min_epochs": None,
        "selection_metric": "macro_f1",
        "hidden": HIDDEN,
        "dropout": DROPOUT,
        "target_sum": 1e6,
        "ssl": True,
        "adversary": True,
        "mixup_alpha": 0.3,
        "sharpen_temperature": 0.5,
        "n_augmentations": 1,
        "augment_pseudolabels": True,
        "input_dropout": 0.1,
        "ssl_max_weight": 1.0,
        "ssl_ramp_epochs": 100,
        "ssl_ramp": "linear",
        "pseudolabel_min_confidence": None,
        "dan_max_weight": 0.1,
        "dan_ramp_epochs": 20,
        "dan_ramp": "sigmoid",
        "adversary_domains": "query",
        "class_weighted": False,
        "weighted_sampling": False,
        "seed": 0,
        "device": "auto",
    }
    nullable_params = frozenset({"patience", "min_epochs", "pseudolabel_min_confidence"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._validate()
        self._train_obs: pd.DataFrame | None = None
        self.domain_names_: list[str] = []
        self.fit_info_: dict[str, Any] = {}

    def _validate(self) -> None:
        p = self.params

        def bad(key: str, fix: str) -> InputError:
            return InputError(
                f"parameter '{key}' of method '{self.name}' is invalid: {p[key]!r}",
                field=key,
                fix=fix,
            )

        choices = {
            "ssl_ramp": ("linear", "sigmoid"),
            "dan_ramp": ("linear", "sigmoid"),
            "adversary_domains": ("query", "batch"),
            "selection_metric": ("macro_f1", "accuracy", "loss"),
        }
        for key, ok in choices.items():
            if p[key] not in ok:
                raise bad(key, "use one of: " + ", ".join(ok))
        if not 0.0 <= p["input_dropout"] < 1.0:
            raise bad("input_dropout", "a probability in [0, 1)")
        if not 0.0 <= p["dropout"] < 1.0:
            raise bad("dropout", "a probability in [0, 1)")
        if p["sharpen_temperature"] < 0:
            raise bad("sharpen_temperature", "a temperature >= 0 (0 = argmax)")
        if p["mixup_alpha"] < 0:
            raise bad("mixup_alpha", "alpha >= 0 (0 switches MixUp off)")
        if p["n_augmentations"] < 1:
            raise bad("n_augmentations", "at least 1")
        if p["target_sum"] <= 0 or p["hidden"] < 1:
            raise bad("target_sum" if p["target_sum"] <= 0 else "hidden", "a positive number")
        for key in ("ssl_ramp_epochs", "dan_ramp_epochs"):
            if p[key] < 0:
                raise bad(key, "a number of epochs >= 0")
        conf = p["pseudolabel_min_confidence"]
        if conf is not None and (
            isinstance(conf, bool) or not isinstance(conf, int | float) or not 0.0 < conf <= 1.0
        ):
            raise bad("pseudolabel_min_confidence", "a probability in (0, 1], or null for off")
        me = p["min_epochs"]
        if me is not None and (isinstance(me, bool) or not isinstance(me, int) or me < 0):
            raise bad("min_epochs", "a whole number >= 0, or null for scNym's rule")

    # ------------------------------------------------------------------ interface
    def fit(
        self,
        train: ad.AnnData,
        valid: ad.AnnData | None = None,
        label_key: str = "cell_type",
        **kwargs: Any,
    ) -> Self:
        """As :meth:`Method.fit`; keeps the training cells' ``batch`` column for the
        adversary's ``'batch'`` domains (never a label column)."""
        cols = [c for c in ("batch",) if c in train.obs.columns]
        self._train_obs = train.obs[cols].copy() if cols else None
        return super().fit(train, valid, label_key, **kwargs)

    def _build_module(self, n_genes: int, n_classes: int) -> nn.Module:
        p = self.params
        return ScNymNet(
            n_genes,
            n_classes,
            hidden=p["hidden"],
            dropout=p["dropout"],
            input_factor=p["target_sum"] / PROJECT_TARGET_SUM,
        )

    def selection_start(self, semi_supervised: bool) -> int:
        """First 0-based epoch eligible for model selection (scNym's ``min_epochs``)."""
        p = self.params
        epochs = p["epochs"]
        if p["min_epochs"] is not None:
            return max(0, min(p["min_epochs"], epochs - 1))
        start = epochs // 20
        if semi_supervised:
            start = max(start, p["ssl_ramp_epochs"] // 5)
        return max(0, min(start, epochs - 1))

    # ------------------------------------------------------------------ training
    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        p = self.params
        seed = int(p["seed"])
        seed_everything(seed)
        device = self.device
        log = self.logger
        n, k = X.shape[0], len(self.classes_)
        net = self._build_module(X.shape[1], k).to(device)

        inputs = self.fit_inputs_
        U = inputs.unlabeled_X if self.uses_unlabeled else None
        n_u = 0 if U is None else int(U.shape[0])
        wants_u = p["ssl"] or p["adversary"]
        if wants_u and n_u == 0:
            log.warning(
                "%s: no unlabeled cells were given: training supervised only (pass the query "
                "cells as `unlabeled=` for MixMatch and the domain adversary)",
                self.name,
            )
        use_ssl = bool(p["ssl"]) and n_u > 0
        use_dan = bool(p["adversary"]) and n_u > 0
        d_l = np.zeros(n, dtype=np.int64)
        d_u = np.zeros(max(n_u, 0), dtype=np.int64)
        adversary: DomainAdversary | None = None
        self.domain_names_ = []
        if use_dan:
            d_l, d_u, names = domain_labels(
                n, self._train_obs_for(n), n_u, inputs.unlabeled_obs, p["adversary_domains"]
            )
            if len(names) < 2:
                log.warning(
                    "%s: all cells are in one domain (%s): no domain adversary",
                    self.name,
                    names,
                )
                use_dan = False
            else:
                self.domain_names_ = names
                adversary = DomainAdversary(p["hidden"], len(names)).to(device)
        params = list(net.parameters()) + (
            list(adversary.parameters()) if adversary is not None else []
        )
        optimizer = torch.optim.Adadelta(params, lr=p["lr"], weight_decay=p["weight_decay"])
        cw = None
        if p["class_weighted"]:
            cw = torch.as_tensor(scnym_class_weights(y, k), dtype=torch.float32, device=device)
        has_valid = X_valid is not None and y_valid is not None and len(y_valid) > 0
        start = self.selection_start(use_ssl)
        self.fit_info_ = {
            "semi_supervised": use_ssl,
            "adversary": use_dan,
            "n_unlabeled": n_u,
            "domains": list(self.domain_names_),
            "selection_start_epoch": start + 1,
        }
        log.info(
            "%s: MixMatch %s, adversary %s (%s), %d unlabeled cells, model selection from "
            "epoch %d on",
            self.name,
            "on" if use_ssl else "off",
            "on" if use_dan else "off",
            ", ".join(self.domain_names_) or "-",
            n_u,
            start + 1,
        )

        checkpoint = self._checkpoint(X, n_u, use_ssl, use_dan)
        history: list[dict[str, Any]] = []
        best_score = -np.inf
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch = 0
        since_best = 0
        stopped = False
        first_epoch = 1
        saved = checkpoint.load(log) if checkpoint is not None else None
        if saved is not None:
            net.load_state_dict(saved["model"])
            if adversary is not None and saved.get("adversary") is not None:
                adversary.load_state_dict(saved["adversary"])
            optimizer.load_state_dict(saved["optimizer"])
            history = list(saved["history"])
            best_score = float(saved["best_score"])
            best_state = saved["best_state"]
            best_epoch = int(saved["best_epoch"])
            since_best = int(saved["since_best"])
            stopped = bool(saved["stopped"])
            first_epoch = int(saved["epoch"]) + 1
            log.info(
                "%s: resuming from %s after epoch %d of %d",
                self.name,
                checkpoint.path,
                first_epoch - 1,
                p["epochs"],
            )

        batch_size = int(p["batch_size"])
        epochs = int(p["epochs"])
        for epoch in range(first_epoch, epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            e0 = epoch - 1  # scNym's schedules count epochs from 0
            rng = np.random.default_rng([seed, epoch])
            torch.manual_seed(epoch_seed(seed, epoch))
            gen = torch.Generator(device=device)
            gen.manual_seed(epoch_seed(seed + 1, epoch))
            w_ssl = (
                ramp_weight(e0, p["ssl_ramp_epochs"], p["ssl_max_weight"], p["ssl_ramp"])
                if use_ssl
                else 0.0
            )
            w_dan = (
                ramp_weight(e0, p["dan_ramp_epochs"], p["dan_max_weight"], p["dan_ramp"])
                if use_dan
                else 0.0
            )
            order = (
                epoch_indices(y, rng, weighted=True)
                if p["weighted_sampling"]
                else rng.permutation(n)
            )
            tail = len(order) % batch_size
            stop = len(order) - tail if 0 < tail < 2 else len(order)
            order = order[:stop]
            labeled = iterate_minibatches(
                X,
                np.stack([y, d_l], axis=1),
                batch_size,
                indices=order,
                device=device,
                min_batch=2,
            )
            unlabeled = None
            if n_u > 0 and (use_ssl or use_dan):
                stream = unlabeled_stream(n_u, len(order), rng)
                unlabeled = iterate_minibatches(
                    U, d_u, batch_size, indices=stream, device=device, min_batch=1
                )
            net.train()
            if adversary is not None:
                adversary.train()
            sums = {"loss": 0.0, "sup": 0.0, "unsup": 0.0, "dan": 0.0, "conf": 0.0}
            seen = 0
            for xb, yb in labeled:
                xl = net.to_model_input(xb)
                labels = yb[:, 0]
                yl = F.one_hot(labels, num_classes=k).to(xl.dtype)
                xu = du = None
                if unlabeled is not None:
                    xub, du = next(unlabeled)
                    xu = net.to_model_input(xub)
                optimizer.zero_grad(set_to_none=True)
                out = step_losses(
                    net,
                    adversary if use_dan else None,
                    xl,
                    yl,
                    yb[:, 1],
                    xu,
                    du,
                    params=p,
                    ssl=use_ssl,
                    w_ssl=w_ssl,
                    w_dan=w_dan,
                    rng=rng,
                    generator=gen,
                    class_weight=cw,
                )
                loss, sup, unsup, dan = out["loss"], out["sup"], out["unsup"], out["dan"]
                confident = out["confident"]
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{self.name}: non-finite loss in epoch {epoch}")
                loss.backward()
                optimizer.step()
                m = int(labels.shape[0])
                seen += m
                sums["loss"] += float(loss.detach()) * m
                sums["sup"] += float(sup.detach()) * m
                sums["unsup"] += float(unsup.detach()) * m
                sums["dan"] += float(dan.detach()) * m
                if confident is not None:
                    sums["conf"] += float(confident.float().mean()) * m
            train_seconds = time.perf_counter() - t0
            mean = {key: v / max(seen, 1) for key, v in sums.items()}
            val_f1 = val_loss = val_acc = None
            if has_valid:
                proba = predict_proba_torch(net, X_valid, batch_size=4096, device=device)
                pred = proba.argmax(axis=1)
                val_f1 = float(
                    f1_score(
                        y_valid, pred, labels=np.unique(y_valid), average="macro", zero_division=0
                    )
                )
                val_acc = float(np.mean(pred == y_valid))
                picked = proba[np.arange(len(y_valid)), y_valid]
                val_loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
            seconds = time.perf_counter() - t0
            history.append(
                {
                    "epoch": epoch,
                    "loss": mean["loss"],
                    "val_macro_f1": val_f1,
                    "val_loss": val_loss,
                    "seconds": seconds,
                    "cells": seen,
                    "cells_per_s": seen / train_seconds if train_seconds > 0 else float("nan"),
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "val_accuracy": val_acc,
                    "sup_loss": mean["sup"],
                    "unsup_loss": mean["unsup"],
                    "dan_loss": mean["dan"],
                    "unsup_weight": w_ssl,
                    "dan_weight": w_dan,
                    "confident_fraction": mean["conf"] if use_ssl else None,
                }
            )
            log.info(
                "epoch %d/%d loss %.4f (sup %.4f, unsup %.4f x %.3f, adversary %.4f, reversal "
                "x %.4f)%s",
                epoch,
                epochs,
                mean["loss"],
                mean["sup"],
                mean["unsup"],
                w_ssl,
                mean["dan"],
                w_dan,
                "" if val_f1 is None else f" val_macro_f1 {val_f1:.3f} val_acc {val_acc:.3f}",
            )
            if has_valid and e0 >= start:
                metric = p["selection_metric"]
                score = {"macro_f1": val_f1, "accuracy": val_acc, "loss": -val_loss}[metric]
                if score > best_score:
                    best_score, best_epoch, since_best = score, epoch, 0
                    best_state = _cpu_state(net)
                else:
                    since_best += 1
                    if p["patience"] is not None and since_best >= p["patience"]:
                        log.info(
                            "%s: early stopping at epoch %d: no validation %s gain for %d epochs",
                            self.name,
                            epoch,
                            metric,
                            since_best,
                        )
                        stopped = True
            if checkpoint is not None:
                checkpoint.save(
                    {
                        "epoch": epoch,
                        "model": _cpu_state(net),
                        "adversary": None if adversary is None else _cpu_state(adversary),
                        "optimizer": _cpu_state(optimizer),
                        "history": history,
                        "best_score": float(best_score),
                        "best_state": best_state,
                        "best_epoch": best_epoch,
                        "since_best": since_best,
                        "stopped": stopped,
                    }
                )
        if best_state is not None:
            net.load_state_dict(best_state)
            log.info(
                "%s: restored the best state: epoch %d (%s %.4f)",
                self.name,
                best_epoch,
                p["selection_metric"],
                best_score if p["selection_metric"] != "loss" else -best_score,
            )
        net.eval()
        self.fit_info_["best_epoch"] = best_epoch or len(history)
        self.history_ = history
        self.module_ = net

    def _train_obs_for(self, n: int) -> pd.DataFrame | None:
        obs = self._train_obs
        return obs if obs is not None and len(obs) == n else None

    def _checkpoint(self, X: Any, n_unlabeled: int, ssl: bool, dan: bool) -> Checkpoint | None:
        base = self.checkpoint(X)
        if base is None:
            return None
        extra = json.dumps([base.fingerprint, n_unlabeled, ssl, dan, self.domain_names_])
        return Checkpoint(base.path, hashlib.sha256(extra.encode()).hexdigest())

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "architecture": {"hidden": [self.params["hidden"]] * 2, "dropout": DROPOUT},
            "input": f"log1p(counts per {self.params['target_sum']:g})",
            "domains": list(self.domain_names_),
            "fit_info": self.fit_info_,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.domain_names_ = list(state.get("domains") or [])
        self.fit_info_ = dict(state.get("fit_info") or {})


@register("scnym_no_adversary")
class ScNymNoAdversary(ScNym):
    """scNym with MixMatch but no domain adversary (scNym's ``no_dan`` config)."""

    default_params: ClassVar[dict[str, Any]] = {**ScNym.default_params, "adversary": False}


@register("scnym_supervised")
class ScNymSupervised(ScNym):
    """scNym's network trained supervised only: the control without unlabeled cells."""

    uses_unlabeled = False
    supervised_control = None
    default_params: ClassVar[dict[str, Any]] = {
        **ScNym.default_params,
        "ssl": False,
        "adversary": False,
    }
