"""Tests of the balancing strategies (celltype_bench.balancing): each would fail without it."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from celltype_bench import balancing as bal
from celltype_bench.errors import InputError
from celltype_bench.methods import base as base_mod  # fit_torch, via the shared torch recipe
from celltype_bench.methods import create, get
from celltype_bench.methods import scbalance as scbalance_mod

SIZES = [500, 50, 5]


def make_xy(sizes=SIZES, n_genes: int = 30, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse log1p-like data, one shifted block of genes per class, continuous values."""
    rng = np.random.default_rng(seed)
    blocks = []
    for c, n in enumerate(sizes):
        dense = rng.gamma(1.0, 1.0, size=(n, n_genes)) * (rng.random((n, n_genes)) < 0.4)
        dense[:, (3 * c) % n_genes : (3 * c) % n_genes + 3] += 3.0 + rng.random((n, 3))
        blocks.append(np.log1p(dense))
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    y = np.repeat(np.arange(len(sizes)), sizes)
    return X, y


def make_adata(sizes=SIZES, seed: int = 0) -> ad.AnnData:
    X, y = make_xy(sizes, seed=seed)
    labels = np.array([f"type_{c}" for c in range(len(sizes))], dtype=object)[y]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(labels),
            "donor_id": pd.Categorical([f"d{i % 4}" for i in range(len(y))]),
            "tissue": ["blood"] * len(y),
            "n_counts": np.arange(len(y), dtype=np.int64),
        },
        index=[f"cell{i}" for i in range(len(y))],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])])
    adata = ad.AnnData(X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    return adata


def _rows(M: sp.csr_matrix) -> set[bytes]:
    return {row.tobytes() for row in M.toarray()}


# ---------------------------------------------------------------- names
def test_strategy_names():
    assert set(bal.STRATEGIES) == {
        "none",
        "class_weight",
        "weighted_sampling",
        "oversample",
        "undersample",
        "smote",
    }
    assert bal.RESAMPLERS == {"oversample", "undersample", "smote"}
    assert bal.WEIGHTINGS == {"class_weight", "weighted_sampling"}
    assert bal.is_resampler("external") and not bal.is_resampler("class_weight")


# ---------------------------------------------------------------- resamplers
def test_oversample_fills_every_class_to_the_largest():
    X, y = make_xy()
    Xr, yr, info = bal.resample(X, y, "oversample", seed=0)
    assert isinstance(Xr, sp.csr_matrix) and Xr.dtype == np.float32
    assert np.bincount(yr).tolist() == [500, 500, 500]
    assert info["class_counts_before"] == {0: 500, 1: 50, 2: 5}
    assert info["class_counts_after"] == {0: 500, 1: 500, 2: 500}
    assert info["n_synthetic"] == 0 and info["seconds"] >= 0
    assert (Xr[: X.shape[0]] != X).nnz == 0  # originals first, unchanged
    assert _rows(Xr[yr == 2]) == _rows(X[y == 2])  # copies only


def test_undersample_keeps_a_subset_as_large_as_the_smallest_class():
    X, y = make_xy()
    Xr, yr, info = bal.resample(X, y, "undersample", seed=0)
    assert isinstance(Xr, sp.csr_matrix)
    assert np.bincount(yr).tolist() == [5, 5, 5]
    assert _rows(Xr) <= _rows(X)
    assert len(_rows(Xr)) == 15  # without replacement


def test_smote_interpolates_between_same_class_cells():
    X, y = make_xy()
    Xr, yr, info = bal.resample(X, y, "smote", seed=0)
    assert isinstance(Xr, sp.csr_matrix) and Xr.dtype == np.float32
    assert np.bincount(yr).tolist() == [500, 500, 500]
    n = X.shape[0]
    assert (Xr[:n] != X).nnz == 0
    synth_X, synth_y = Xr[n:].toarray(), yr[n:]
    assert info["n_synthetic"] == len(synth_y) == 450 + 495
    originals = _rows(X)
    for c in (1, 2):
        own = X[y == c].toarray()
        rows = synth_X[synth_y == c]
        assert np.all(rows >= own.min(axis=0) - 1e-6) and np.all(rows <= own.max(axis=0) + 1e-6)
        assert not any(r.tobytes() in originals for r in rows)
    assert info["k_used"] == {1: 5, 2: 4}  # 5 cells: k adapts to n_c - 1


def test_smote_matches_imblearn_exactly():
    from imblearn.over_sampling import SMOTE

    X, y = make_xy([300, 60, 20], seed=3)
    ref_X, ref_y = SMOTE(random_state=7).fit_resample(X, y)
    Xr, yr, _ = bal.resample(X, y, "smote", seed=7)
    np.testing.assert_array_equal(yr, ref_y)
    assert abs(Xr - ref_X).max() == 0


def test_smote_single_cell_class_is_randomly_oversampled(caplog):
    X, y = make_xy([40, 12, 1])
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        Xr, yr, info = bal.resample(X, y, "smote", seed=0)
    assert np.bincount(yr).tolist() == [40, 40, 40]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("class 2 has a single cell" in m for m in msgs)
    assert info["randomly_oversampled_single_cells"] == [2]
    assert _rows(Xr[yr == 2]) == _rows(X[y == 2])  # copies of the one cell


def test_smote_bad_params_raise_input_error():
    X, y = make_xy()
    with pytest.raises(InputError, match="k_neighbors"):
        bal.resample(X, y, "smote", seed=0, params={"k_neighbors": 0})
    with pytest.raises(InputError, match="unknown parameter 'n_jobs'"):
        bal.resample(X, y, "smote", seed=0, params={"n_jobs": 2})
    with pytest.raises(InputError, match="at least 2 classes"):
        bal.resample(X, np.zeros(X.shape[0], dtype=int), "smote", seed=0)


def test_non_resampling_strategies_return_the_input():
    X, y = make_xy()
    for s in ("none", "class_weight", "weighted_sampling"):
        Xr, yr, info = bal.resample(X, y, s, seed=0)
        assert Xr is X and np.array_equal(yr, y) and info["resampled"] is False
    with pytest.raises(InputError, match="unknown balancing strategy"):
        bal.resample(X, y, "smoth", seed=0)


@pytest.mark.parametrize("strategy", ["oversample", "undersample", "smote"])
def test_resampling_is_deterministic_per_seed(strategy):
    X, y = make_xy()
    a = bal.resample(X, y, strategy, seed=1)
    b = bal.resample(X, y, strategy, seed=1)
    c = bal.resample(X, y, strategy, seed=2)
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[0] != b[0]).nnz == 0
    assert a[0].shape != c[0].shape or (a[0] != c[0]).nnz > 0


# ---------------------------------------------------------------- external balancers
def test_bad_external_path_names_the_path_and_the_fix():
    X, y = make_xy()
    for path in ("imblearn.over_sampling.NoSuchSampler", "no_such_pkg.Balancer", "nodots"):
        with pytest.raises(InputError) as err:
            bal.resample(X, y, "external", seed=0, external=path)
        assert path in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(InputError, match="is not a resampler"):
        bal.resample(X, y, "external", seed=0, external="collections.OrderedDict")
    with pytest.raises(InputError, match="needs the import path"):
        bal.resample(X, y, "external", seed=0)


def test_external_imblearn_samplers_with_params():
    X, y = make_xy()
    Xr, yr, info = bal.resample(
        X,
        y,
        "external",
        seed=0,
        external="imblearn.under_sampling.NearMiss",
        params={"version": 1, "n_neighbors": 3},
    )
    assert isinstance(Xr, sp.csr_matrix) and np.bincount(yr).tolist() == [5, 5, 5]
    Xa, ya, info = bal.resample(
        X, y, "adasyn", seed=0, external="imblearn.over_sampling.ADASYN", params={"n_neighbors": 3}
    )
    counts = np.bincount(ya)
    assert isinstance(Xa, sp.csr_matrix) and counts.min() >= 0.8 * 500
    assert info["strategy"] == "adasyn" and info["n_synthetic"] == len(ya) - len(y)
    Xb, yb, _ = bal.resample(
        X, y, "adasyn", seed=0, external="imblearn.over_sampling.ADASYN", params={"n_neighbors": 3}
    )
    assert (Xa != Xb).nnz == 0  # the seed reaches random_state
    with pytest.raises(InputError, match="class 2 has only 5 cells"):
        bal.resample(X, y, "external", seed=0, external="imblearn.over_sampling.ADASYN", params={})
    with pytest.raises(InputError, match="cannot create"):
        bal.resample(
            X, y, "external", seed=0, external="imblearn.over_sampling.ADASYN", params={"k": 1}
        )


def test_external_user_class_from_a_file(tmp_path):
    (tmp_path / "my_balancer.py").write_text(
        "import numpy as np\n"
        "class KeepFirst:\n"
        "    def __init__(self, per_class=2, random_state=None):\n"
        "        self.per_class, self.random_state = per_class, random_state\n"
        "    def fit_resample(self, X, y):\n"
        "        idx = np.concatenate([np.flatnonzero(y == c)[: self.per_class]\n"
        "                              for c in np.unique(y)])\n"
        "        self.sample_indices_ = idx\n"
        "        return X[idx], y[idx]\n"
    )
    adata = make_adata()
    out = bal.resample_adata(
        adata,
        "external",
        seed=0,
        external=f"{tmp_path / 'my_balancer.py'}:KeepFirst",
        params={"per_class": 3},
    )
    assert out.obs["cell_type"].value_counts().tolist() == [3, 3, 3]
    assert set(out.obs_names) <= set(adata.obs_names)


# ---------------------------------------------------------------- AnnData
@pytest.mark.parametrize("strategy", ["oversample", "undersample", "smote"])
def test_resample_adata_keeps_sparse_x_and_unique_names(strategy, tmp_path):
    adata = make_adata()
    out = bal.resample_adata(adata, strategy, seed=0)
    assert isinstance(out.X, sp.csr_matrix) and out.X.dtype == np.float32
    assert out.obs_names.is_unique
    assert list(out.var_names) == list(adata.var_names)
    counts = out.obs["cell_type"].value_counts()
    assert counts.nunique() == 1
    assert isinstance(out.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert out.uns["balancing"]["class_counts_before"] == {
        "type_0": 500,
        "type_1": 50,
        "type_2": 5,
    }
    copied = out.obs_names.isin(adata.obs_names) | out.obs_names.str.contains("-dup")
    base = out.obs_names[copied].str.replace(r"-dup\d+$", "", regex=True)
    assert set(base) <= set(adata.obs_names)
    pd.testing.assert_series_equal(
        out.obs.loc[copied, "donor_id"].astype(str),
        adata.obs.loc[base, "donor_id"].astype(str).set_axis(out.obs_names[copied]),
    )
    if strategy == "oversample":
        assert out.obs_names.str.contains("-dup").sum() == 1500 - 555
    if strategy == "smote":
        synth = out.obs_names.str.startswith("smote-")
        assert synth.sum() == 1500 - 555
        assert (out.obs.loc[synth, "tissue"] == "synthetic").all()
        assert (out.obs.loc[synth, "donor_id"] == "synthetic").all()
        assert out.obs.loc[synth, "n_counts"].isna().all()
    out.write_h5ad(tmp_path / "out.h5ad")  # h5ad-writable (uns included)


def test_resample_adata_none_returns_input():
    adata = make_adata()
    assert bal.resample_adata(adata, "none", seed=0) is adata
    assert bal.resample_adata(adata, "weighted_sampling", seed=0) is adata


# ---------------------------------------------------------------- weightings
def test_class_weights_follow_sctab():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    np.testing.assert_allclose(bal.class_weights(y, 3), [10 / 18, 10 / 9, 10 / 3])


def test_weighted_epochs_are_class_balanced():
    y = np.repeat([0, 1, 2], SIZES)
    draws = [bal.epoch_indices(y, np.random.default_rng([0, e])) for e in range(5)]
    assert all(len(d) == len(y) for d in draws)
    shares = np.array([np.bincount(y[d], minlength=3) / len(y) for d in draws])
    np.testing.assert_allclose(shares.mean(axis=0), [1 / 3] * 3, atol=0.03)
    assert np.all(np.abs(shares - 1 / 3) < 0.08)  # every single epoch too


def _capture_fit_torch(monkeypatch, module):
    seen: dict = {}

    def fake(model, X, y, **kwargs):
        seen.update(kwargs, y=np.asarray(y))
        return []

    monkeypatch.setattr(module, "fit_torch", fake)
    return seen


def test_linear_weighted_sampling_reaches_the_training_loop(monkeypatch):
    seen = _capture_fit_torch(monkeypatch, base_mod)
    adata = make_adata()
    create("linear", **bal.configure("linear", {}, "weighted_sampling")).fit(adata)
    assert seen["sampler"] is not None
    np.testing.assert_array_equal(seen["class_weights"], np.ones(3))
    y = seen["y"]
    idx = np.concatenate([seen["sampler"](np.random.default_rng(e)) for e in range(4)])
    share = np.bincount(y[idx], minlength=3) / len(idx)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.03)
    create("linear", **bal.configure("linear", {}, "none")).fit(adata)
    assert seen["sampler"] is None


def test_scbalance_class_weight_reaches_the_loss(monkeypatch):
    seen = _capture_fit_torch(monkeypatch, scbalance_mod)
    adata = make_adata()
    create("scbalance", **bal.configure("scbalance", {}, "class_weight")).fit(adata)
    np.testing.assert_allclose(seen["class_weights"], 555 / (3 * np.array(SIZES)))
    assert seen["loss_fn"] is None
    y = seen["y"]
    order = seen["sampler"](np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(y)))  # no weighted sampling on top
    create("scbalance", **bal.configure("scbalance", {}, "smote")).fit(adata)
    assert seen["class_weights"] is None


# ---------------------------------------------------------------- configure / resolve
EXPECTED = {
    ("linear", "none"): {"class_weighted": False, "weighted_sampling": False},
    ("linear", "class_weight"): {"class_weighted": True, "weighted_sampling": False},
    ("linear", "weighted_sampling"): {"class_weighted": False, "weighted_sampling": True},
    ("linear", "smote"): {"class_weighted": False, "weighted_sampling": False},
    ("scbalance", "none"): {"class_weighted": False, "weighted_sampling": False},
    ("scbalance", "class_weight"): {"class_weighted": True, "weighted_sampling": False},
    ("scbalance", "weighted_sampling"): {"class_weighted": False, "weighted_sampling": True},
    ("scbalance", "oversample"): {"class_weighted": False, "weighted_sampling": False},
    ("scbalance", "external"): {"class_weighted": False, "weighted_sampling": False},
    ("celltypist", "none"): {"balance_cell_type": False},
    ("celltypist", "weighted_sampling"): {"balance_cell_type": True},
    ("celltypist", "undersample"): {"balance_cell_type": False},
    ("majority", "none"): {},
    ("majority", "smote"): {},
    ("random", "oversample"): {},
}


@pytest.mark.parametrize(("method", "strategy"), sorted(EXPECTED))
def test_configure_sets_exactly_the_strategy(method, strategy):
    extra = {"epochs": 3} if method in ("linear", "scbalance", "celltypist") else {}
    out = bal.configure(method, extra, strategy)
    assert out == {**extra, **EXPECTED[(method, strategy)]}
    create(method, **out)  # accepted by the method


@pytest.mark.parametrize(
    ("method", "strategy"),
    [
        ("celltypist", "class_weight"),
        ("majority", "class_weight"),
        ("random", "weighted_sampling"),
    ],
)
def test_configure_rejects_unsupported_pairs(method, strategy):
    with pytest.raises(InputError) as err:
        bal.configure(method, {}, strategy)
    msg = str(err.value)
    assert method in msg and strategy in msg
    for s in bal.supported_strategies(method):
        assert s in msg
    assert "none" in bal.supported_strategies(method)


def test_configure_overrides_conflicting_params_and_resolves_native(caplog):
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        out = bal.configure("linear", {"class_weighted": True}, "none")
    assert out["class_weighted"] is False
    assert any("class_weighted" in r.getMessage() for r in caplog.records)
    assert bal.resolve("native", "linear") == "class_weight"
    assert bal.resolve("native", "scbalance") == "weighted_sampling"
    assert bal.resolve("native", "celltypist") == "none"
    assert bal.resolve("native", "majority") == "none"
    assert bal.resolve("smote", "linear") == "smote"
    for name in ("linear", "scbalance", "celltypist", "majority", "random"):
        cls = get(name)
        assert set(cls.balancing_params) == set(cls.supported_weightings)
        # native settings are the methods' defaults
        assert bal.configure(name, {}, "native") == {
            k: v for k, v in cls.default_params.items() if k in cls.balancing_params.values()
        }
    with pytest.raises(InputError, match="unknown balancing strategy"):
        bal.configure("linear", {}, "smoth")
    with pytest.raises(InputError, match="unknown method"):
        bal.configure("nope", {}, "none")


# ---------------------------------------------------------------- exact neighbours
def test_exact_knn_matches_scikit_learn():
    X, _ = make_xy([200, 150, 90])
    Q = X[:37] * 1.05
    for block in (64, 4096):
        d, i = bal.exact_knn(X, 5, block=block)
        rd, ri = NearestNeighbors(n_neighbors=6).fit(X).kneighbors(X)
        np.testing.assert_array_equal(i, ri[:, 1:])
        np.testing.assert_allclose(d, rd[:, 1:], atol=1e-4)
        d, i = bal.exact_knn(X, 4, Q, block=block)
        rd, ri = NearestNeighbors(n_neighbors=4).fit(X).kneighbors(Q)
        np.testing.assert_array_equal(i, ri)
    nn = bal.ExactNeighbors(n_neighbors=3).fit(X)
    idx = nn.kneighbors(X, return_distance=False)
    assert (idx[:, 0] == np.arange(X.shape[0])).all()
    assert nn.kneighbors_graph(X).shape == (X.shape[0], X.shape[0])


# ---------------------------------------------------------------- timing
def test_time_strategies_one_row_per_strategy():
    X, y = make_xy()
    strategies = [*bal.STRATEGIES, "imblearn.under_sampling.RandomUnderSampler"]
    t = bal.time_strategies(X, y, strategies, seed=0, repeats=2)
    assert list(t.columns) == ["strategy", "n_cells", "seconds", "n_out"]
    assert t["strategy"].tolist() == strategies
    assert (t["n_out"] > 0).all() and (t["seconds"] >= 0).all()
    assert (t["n_cells"] == len(y)).all()
    out = dict(zip(t["strategy"], t["n_out"], strict=True))
    assert out["oversample"] == out["smote"] == 1500
    assert out["undersample"] == out["imblearn.under_sampling.RandomUnderSampler"] == 15
    assert out["weighted_sampling"] == out["none"] == out["class_weight"] == len(y)
    ext = bal.time_strategies(
        X,
        y,
        ["nearmiss"],
        seed=0,
        externals={"nearmiss": {"class": "imblearn.under_sampling.NearMiss"}},
    )
    assert ext["n_out"].tolist() == [15]
