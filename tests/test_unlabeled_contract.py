"""The unlabeled-cell contract of the train step: test cells' expression, never their labels."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltype_bench import steps
from celltype_bench.errors import InputError
from celltype_bench.methods import Method, create, register

SEEN: dict[str, object] = {}


@register("spy_unlabeled")
class SpyUnlabeled(Method):
    """Nearest class centroid, with centroids pulled towards the unlabeled cells' mean."""

    uses_unlabeled = True
    default_params = {"seed": 0}

    def _fit(self, X, y, X_valid, y_valid):
        inp = self.fit_inputs_
        SEEN["obs_columns"] = list(inp.unlabeled_obs.columns)
        SEEN["n_unlabeled"] = inp.unlabeled_X.shape[0]
        shift = np.asarray(inp.unlabeled_X.mean(axis=0)).ravel()
        k = len(self.classes_)
        self.centroids_ = (
            np.stack([np.asarray(X[y == c].mean(axis=0)).ravel() for c in range(k)]) + 0.5 * shift
        )

    def _predict_proba(self, X):
        d = ((X.toarray()[:, None, :] - self.centroids_[None]) ** 2).sum(axis=2)
        e = np.exp(-(d - d.min(axis=1, keepdims=True)))
        return e / e.sum(axis=1, keepdims=True)


def _write_task(tmp_path, shuffle_test_labels: bool, pool: bool = False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n, g = 120, 8
    y = np.repeat(["A", "B", "C"], n // 3)
    X = rng.poisson(1.0, size=(n, g)).astype(np.float32)
    for i, c in enumerate("ABC"):
        X[y == c, 2 * i : 2 * i + 2] += 4
    obs = pd.DataFrame(
        {
            "cell_type": y,
            "cell_type_ontology_term_id": "CL:0000000",
            "donor_id": "d0",
            "batch": np.where(np.arange(n) % 2, "b1", "b2"),
        },
        index=[f"c{i}" for i in range(n)],
    )
    roles = np.where(np.arange(n) % 4 == 0, "test", "train")
    if pool:  # a labeled-cell tier: every other training cell is left out, without its label
        roles = np.where((roles == "train") & (np.arange(n) % 4 == 1), "unlabeled", roles)
    if shuffle_test_labels:
        for role in ("test", "unlabeled"):
            t = roles == role
            obs.loc[t, "cell_type"] = rng.permutation(obs.loc[t, "cell_type"].to_numpy())
    adata = ad.AnnData(
        sp.csr_matrix(np.log1p(X)), obs=obs, var=pd.DataFrame(index=list("abcdefgh"))
    )
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    split = tmp_path / "split.parquet"
    pd.DataFrame({"cell_id": obs.index, "replicate": "r0", "role": roles}).to_parquet(split)
    return str(data), str(split)


def _run(tmp_path, shuffle, pool=False):
    data, split = _write_task(tmp_path, shuffle, pool)
    out = tmp_path / "out"
    steps.train_run(
        data=data,
        split=split,
        replicate="r0",
        method={"name": "spy_unlabeled", "params": {}},
        balancing={"name": "none", "strategy": "none"},
        seed=0,
        out_predictions=str(out / "predictions.parquet"),
        out_run=str(out / "run.json"),
        out_model=str(out / "model"),
        out_history=str(out / "history.tsv"),
    )
    return pd.read_parquet(out / "predictions.parquet")


def test_unlabeled_method_gets_test_expression_but_no_labels(tmp_path):
    a = _run(tmp_path / "a", shuffle=False)
    assert SEEN["n_unlabeled"] == 30
    assert not {"cell_type", "cell_type_ontology_term_id"} & set(SEEN["obs_columns"])
    assert "domain" in SEEN["obs_columns"] and "batch" in SEEN["obs_columns"]
    b = _run(tmp_path / "b", shuffle=True)
    # shuffled test labels change the truth column, never what the method predicts
    assert not a["true_label"].equals(b["true_label"])
    pd.testing.assert_frame_equal(a.drop(columns="true_label"), b.drop(columns="true_label"))
    assert (a["uncertainty"] >= 0).all() and (a["uncertainty"] <= 1).all()


def test_supervised_method_refuses_unlabeled_cells():
    X = sp.csr_matrix(np.eye(4, dtype=np.float32))
    train = ad.AnnData(X, obs=pd.DataFrame({"cell_type": list("AABB")}, index=list("wxyz")))
    with pytest.raises(InputError, match="does not learn from unlabeled"):
        create("majority").fit(train, unlabeled=train)


def test_left_out_training_cells_reach_the_method_without_labels(tmp_path):
    """Split role ``unlabeled`` (a labeled-cell tier's left-out cells): expression only."""
    a = _run(tmp_path / "a", shuffle=False, pool=True)
    assert SEEN["n_unlabeled"] == 30 + 30  # the test cells + the left-out training cells
    assert not {"cell_type", "cell_type_ontology_term_id"} & set(SEEN["obs_columns"])
    assert len(a) == 30  # only the test cells are predicted
    b = _run(tmp_path / "b", shuffle=True, pool=True)
    pd.testing.assert_frame_equal(a.drop(columns="true_label"), b.drop(columns="true_label"))


def test_unlabeled_cells_mark_the_pool_as_training_domain():
    X = sp.csr_matrix(np.eye(3, dtype=np.float32))
    genes = pd.Index(["g0", "g1", "g2"])

    def cells(ids):
        obs = pd.DataFrame({"cell_type": "A", "batch": "b"}, index=ids)
        return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))

    out = steps.unlabeled_cells(
        cells(["t0", "t1", "t2"]), [], genes, pool=cells(["p0", "p1", "p2"])
    )
    assert list(out.obs["domain"]) == ["query"] * 3 + ["training"] * 3
    assert "cell_type" not in out.obs.columns
