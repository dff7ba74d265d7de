"""A deep ensemble (Lakshminarayanan et al. 2017) of any registered method, as in scTab.

scTab quantifies uncertainty with 5 models trained with different seeds: the ensemble's
probabilities are the mean of the members' probabilities and a cell's uncertainty is
``1 - max`` of them (:meth:`Ensemble.uncertainty`; the train step writes it into the
predictions file). :meth:`Ensemble.member_spread` adds the members' disagreement (standard
deviation across members of the probability of the ensemble's predicted class).

Parameters: ``member`` (a registered method name, default ``sctab``), ``n_members`` (5),
``member_params`` (the members' parameters; default none = the member's defaults), ``seed``.
Member ``k`` gets seed ``SeedSequence([seed, k])`` (so replicates with consecutive seeds share
no member), which is why ``member_params`` may not hold ``seed``.

What the members receive: the ensemble's training and validation cells, the augmentation
vectors (``FitInputs.augmentation``), the unlabeled cells (when the member learns from them)
and a checkpoint folder each (``<checkpoint_dir>/member_k``). A member that finished is saved
there too, so a rerun after a kill reloads the finished members and resumes the one that
was training.

Balancing. The class attributes mirror the default member, scTab (native 'class_weight';
switches ``class_weighted`` and ``weighted_sampling``), because ``balancing.configure`` reads
them from the class. Each switch is null by default (the member's own default) and, when
set, is forwarded to the member's own switch for that weighting (``Method.balancing_params``:
e.g. xgboost's ``class_weighted``, celltypist's ``balance_cell_type``); switching on a
weighting the member lacks is an InputError, switching it off is a no-op. For a member whose
published balancing is not 'class_weight' (celltypist, scbalance), name the strategy
explicitly instead of 'native'. ``uses_unlabeled`` and ``is_control`` are copied from the
member class onto each instance (the train step reads the instance).

Saved as one subfolder per member (``member_0``, ...), each written by the member's own
``save``; ``method.json`` lists them with their seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..io import write_json
from .base import METHOD_JSON, Method
from .registry import create, get, register

_SWITCHES: dict[str, str] = {
    "class_weight": "class_weighted",
    "weighted_sampling": "weighted_sampling",
}
"""Ensemble-level balancing switch of each weighting."""
_FINGERPRINT = "fingerprint.json"


def member_seed(seed: int, k: int) -> int:
    """The seed of member ``k`` of an ensemble seeded ``seed`` (a 31-bit integer)."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(k)]).generate_state(1)[0]
    return int(state % 2**31)


@register("ensemble")
class Ensemble(Method):
    """Mean of ``n_members`` copies of a registered method trained with different seeds."""

    native_balancing = "class_weight"
    supported_weightings = frozenset({"class_weight", "weighted_sampling"})
    balancing_params = dict(_SWITCHES)
    default_params = {
        "member": "sctab",
        "n_members": 5,
        "member_params": {},
        "class_weighted": None,
        "weighted_sampling": None,
        "seed": 0,
    }
    nullable_params = frozenset({"member_params", "class_weighted", "weighted_sampling"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        p["member_params"] = dict(p["member_params"] or {})  # never share the class default
        member_cls, effective, overridden = self._resolve_member(p)
        for switch, target, old in overridden:
            self.logger.warning(
                "ensemble: %s=%s overrides member_params %s=%r", switch, p[switch], target, old
            )
        self.member_cls_ = member_cls
        self.member_params_: dict[str, Any] = effective
        self.uses_unlabeled = bool(member_cls.uses_unlabeled)  # type: ignore[misc]
        self.is_control = bool(member_cls.is_control)  # type: ignore[misc]
        self.members_: list[Method] = []
        self.member_seeds_: list[int] = []

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str | None = None) -> dict[str, Any]:
        """All parameters with defaults, plus the member and its parameters checked."""
        checked = super().check_params(params, where)
        try:
            cls._resolve_member(checked)
        except InputError as exc:
            if where is None:
                raise
            raise InputError(exc.problem, file=where, field=exc.field, fix=exc.fix) from None
        return checked

    @staticmethod
    def _resolve_member(
        p: dict[str, Any],
    ) -> tuple[type[Method], dict[str, Any], list[tuple[str, str, Any]]]:
        """Member class, the member parameters with the balancing switches applied, and the
        (switch, member parameter, given value) triples a switch overrode."""
        if p["member"] == Ensemble.name:
            raise InputError("an ensemble cannot have ensemble members", field="member")
        member_cls = get(p["member"])
        if p["n_members"] < 1:
            raise InputError(
                f"parameter 'n_members' of method 'ensemble' must be >= 1, got {p['n_members']}",
                field="n_members",
                fix="scTab uses 5",
            )
        raw = {} if p["member_params"] is None else p["member_params"]
        if not isinstance(raw, dict):
            raise InputError(
                f"parameter 'member_params' of method 'ensemble' must be a mapping, got {raw!r}",
                field="member_params",
                fix="write the members' parameters as a mapping, e.g. {epochs: 20}",
            )
        if "seed" in raw:
            raise InputError(
                "member_params may not set 'seed': member k is seeded from the ensemble's seed",
                field="member_params.seed",
                fix="set the ensemble's own 'seed' instead",
            )
        if "seed" not in member_cls.default_params:
            raise InputError(
                f"method '{p['member']}' has no seed, so its ensemble members would be identical",
                field="member",
                fix="ensemble a method with a 'seed' parameter (e.g. sctab, mlp, xgboost)",
            )
        effective, overridden = dict(raw), []
        for weighting, switch in _SWITCHES.items():
            value = p[switch]
            if value is None:
                continue
            if not isinstance(value, bool | np.bool_):
                raise InputError(
                    f"parameter '{switch}' of method 'ensemble' must be true, false or null",
                    field=switch,
                )
            target = member_cls.balancing_params.get(weighting)
            if target is None:
                if value:
                    raise InputError(
                        f"member method '{p['member']}' does not support the balancing "
                        f"weighting '{weighting}'",
                        field=switch,
                        fix=f"'{p['member']}' supports: "
                        + (", ".join(sorted(member_cls.supported_weightings)) or "none"),
                    )
                continue
            if target in raw and raw[target] != value:
                overridden.append((switch, target, raw[target]))
            effective[target] = bool(value)
        try:
            member_cls.check_params(effective)  # unknown / mistyped member parameters
        except InputError as exc:
            raise InputError(
                f"member_params: {exc.problem}", field=f"member_params.{exc.field}", fix=exc.fix
            ) from None
        return member_cls, effective, overridden

    @classmethod
    def augments(cls, params: dict[str, Any] | None = None) -> bool:
        """Whether an ensemble with these parameters trains members with augmentation vectors."""
        params = dict(params or {})
        member_cls = get(params.get("member", cls.default_params["member"]))
        if "augment" not in member_cls.default_params:
            return False
        mp = params.get("member_params") or {}
        return bool(mp.get("augment", member_cls.default_params["augment"]))

    # ------------------------------------------------------------------ helpers
    def _adata(self, X: Any, y: np.ndarray | None = None) -> ad.AnnData:
        obs = pd.DataFrame(index=pd.Index([f"c{i}" for i in range(X.shape[0])]))
        if y is not None:
            labels = np.asarray(self.classes_, dtype=object)[y]
            obs[self.label_key] = pd.Categorical(labels, categories=self.classes_)
        return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(self.var_names_)))

    def _fingerprint(self, k: int, seed: int, X: Any) -> str:
        return json.dumps(
            [self.member_cls_.name, self.member_params_, seed, k, self.classes_, list(X.shape)],
            sort_keys=True,
            default=str,
        )

    def _finished_member(self, where: Path | None, fingerprint: str) -> Method | None:
        """A member saved by an earlier (killed) run of the same configuration, if any."""
        if where is None or not (where / "model" / METHOD_JSON).exists():
            return None
        try:
            saved = json.loads((where / _FINGERPRINT).read_text())
            if saved.get("fingerprint") != fingerprint:
                return None
            member = Method.load(where / "model")
        except (OSError, ValueError) as exc:
            self.logger.warning("ensemble: ignoring saved member in %s (%s)", where, exc)
            return None
        self.logger.info("ensemble: reusing the finished member saved in %s", where)
        return member

    # ------------------------------------------------------------------ fit / predict
    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        p = self.params
        inputs = self.fit_inputs_
        train = self._adata(X, y)
        valid = None if X_valid is None or y_valid is None else self._adata(X_valid, y_valid)
        unlabeled = None
        if self.uses_unlabeled and inputs.unlabeled_X is not None:
            obs = inputs.unlabeled_obs
            if obs is None:
                obs = pd.DataFrame(index=[f"u{i}" for i in range(inputs.unlabeled_X.shape[0])])
            unlabeled = ad.AnnData(
                X=inputs.unlabeled_X,
                obs=obs.copy(),
                var=pd.DataFrame(index=pd.Index(self.var_names_)),
            )
        self.members_, self.member_seeds_, history = [], [], []
        for k in range(p["n_members"]):
            seed = member_seed(p["seed"], k)
            where = None if inputs.checkpoint_dir is None else inputs.checkpoint_dir / f"member_{k}"
            fingerprint = self._fingerprint(k, seed, X)
            member = self._finished_member(where, fingerprint)
            if member is None:
                self.logger.info(
                    "ensemble: member %d/%d (%s, seed %d)", k + 1, p["n_members"], p["member"], seed
                )
                member = create(p["member"], **self.member_params_, seed=seed)
                member.fit(
                    train,
                    valid,
                    label_key=self.label_key,
                    unlabeled=unlabeled,
                    augmentation=inputs.augmentation,
                    checkpoint_dir=where,
                )
                if where is not None:
                    member.save(where / "model")
                    write_json({"fingerprint": fingerprint}, where / _FINGERPRINT)
            if list(member.classes_) != list(self.classes_):
                raise RuntimeError(
                    f"ensemble member {k} has classes {member.classes_}, not {self.classes_}"
                )
            self.members_.append(member)
            self.member_seeds_.append(seed)
            history += [{"member": k, **h} for h in member.history_]
        self.history_ = history

    @property
    def n_parameters_(self) -> int | None:
        """Trainable parameters of all members together (None when a member has no module)."""
        from ..steps import count_parameters

        counts = [count_parameters(m) for m in self.members_]
        if not counts or any(c is None for c in counts):
            return None
        return int(sum(c for c in counts if c is not None))

    def predict_members(self, test: ad.AnnData) -> np.ndarray:
        """Every member's probabilities: array (members, cells, classes_)."""
        self._require_fitted()
        return np.stack([m.predict_proba(test).to_numpy() for m in self.members_], axis=0)

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        return self.predict_members(self._adata(X)).mean(axis=0)

    def uncertainty(self, test: ad.AnnData) -> np.ndarray:
        """scTab's ensemble uncertainty per cell: 1 - max of the mean member probabilities."""
        return 1.0 - self.predict_proba(test).to_numpy().max(axis=1)

    def member_spread(self, test: ad.AnnData) -> np.ndarray:
        """Per cell, the standard deviation across members of the predicted class's probability."""
        per_member = self.predict_members(test)
        top = per_member.mean(axis=0).argmax(axis=1)
        picked = per_member[:, np.arange(per_member.shape[1]), top]
        return picked.std(axis=0)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "member": self.member_cls_.name,
            "member_params": self.member_params_,
            "members": [
                {"dir": f"member_{k}", "seed": s} for k, s in enumerate(self.member_seeds_)
            ],
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._saved_members = list(state.get("members") or [])
        self.member_seeds_ = [int(m["seed"]) for m in self._saved_members]

    def _save_weights(self, path: Path) -> None:
        for k, member in enumerate(self.members_):
            member.save(path / f"member_{k}")

    def _load_weights(self, path: Path) -> None:
        entries = getattr(self, "_saved_members", [])
        if len(entries) != self.params["n_members"]:
            raise InputError(
                f"saved ensemble lists {len(entries)} members, expected {self.params['n_members']}",
                file=str(path / METHOD_JSON),
                fix="rerun training",
            )
        members = []
        for entry in entries:
            member = Method.load(path / entry["dir"])
            if member.name != self.member_cls_.name or member.classes_ != self.classes_:
                raise InputError(
                    f"saved member {entry['dir']} is a '{member.name}' with other classes or "
                    f"method than the ensemble's '{self.member_cls_.name}'",
                    file=str(path / entry["dir"]),
                    fix="rerun training",
                )
            members.append(member)
        self.members_ = members
