"""Same config and seed give identical predictions on CPU, for every registered method."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltype_bench.methods import available, create, get

# Short schedules so that every method fits in seconds; anything not listed runs with its
# defaults (a new method is covered automatically once registered).
FAST = {
    "linear": {"epochs": 3, "batch_size": 32},
    "scbalance": {"epochs": 2, "batch_size": 32},
    "celltypist": {"epochs": 2, "batch_size": 50, "top_genes": 20},
    "sctab": {"epochs": 2, "batch_size": 64, "virtual_batch_size": 32, "n_d": 16, "n_a": 8},
    "mlp": {"epochs": 2, "batch_size": 64},
    "xgboost": {"n_estimators": 5, "n_components": 8},
    "ensemble": {"n_members": 2, "member": "linear", "member_params": {"epochs": 2}},
    "scnym": {"epochs": 2},
    "scnym_no_adversary": {"epochs": 2},
    "scnym_supervised": {"epochs": 2},
    "scpretrain": {"pretrain_epochs": 2, "epochs": 2},
    "scpretrain_nopretrain": {"epochs": 2},
    "scpretrain_lr": {"pretrain_epochs": 2},
    "scpretrain_rf": {"pretrain_epochs": 2},
    "scpretrain_svm": {"pretrain_epochs": 2},
}
SKIP = {"spy_unlabeled", "toy_centroid"}  # test helpers registered by other test modules


def _data(n: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    y = rng.choice(list("ABCD"), size=n, p=[0.4, 0.3, 0.2, 0.1])
    X = rng.poisson(0.5, size=(n, 40)).astype(np.float32)
    for i, c in enumerate("ABCD"):
        X[y == c, 5 * i : 5 * i + 5] += rng.poisson(5, size=((y == c).sum(), 5))
    obs = pd.DataFrame(
        {"cell_type": y, "donor_id": rng.choice(["d1", "d2", "d3"], n), "batch": "b"},
        index=[f"s{seed}c{i}" for i in range(n)],
    )
    return ad.AnnData(
        sp.csr_matrix(np.log1p(X)), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)])
    )


def _params(name: str) -> dict:
    accepted = get(name).default_params
    return {k: v for k, v in FAST.get(name, {}).items() if k in accepted}


def _fit_predict(name: str) -> pd.DataFrame:
    train, valid, test = _data(240, 0), _data(60, 1), _data(80, 2)
    params = _params(name)
    if "device" in get(name).default_params:
        params["device"] = "cpu"
    if "seed" in get(name).default_params:
        params["seed"] = 7
    est = create(name, **params)
    kwargs = {"unlabeled": test} if est.uses_unlabeled else {}
    est.fit(train, valid, **kwargs)
    return est.predict_proba(test)


@pytest.mark.parametrize("name", sorted(set(available()) - SKIP))
def test_same_seed_same_predictions(name):
    a = _fit_predict(name)
    b = _fit_predict(name)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
