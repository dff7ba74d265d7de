"""scTab's augmentation vectors: recipe, training cells only, files, and the batch transform."""

from __future__ import annotations

import logging
from itertools import combinations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from celltype_bench import io
from celltype_bench.augmentation import (
    _compute,
    _sample_weights,
    apply_augmentation,
    augmentation_step,
    compute_augmentation_vectors,
    load_vectors,
    read_vectors_info,
    save_vectors,
)
from celltype_bench.errors import InputError

SMALL = {"n_clusters": 4, "min_cluster_size": 3, "n_vectors": 20}


def make_donor_adata(
    seed: int = 0,
    n_types: int = 3,
    n_donors: int = 5,
    cells: int = 12,
    n_genes: int = 30,
    donors_of_type: dict[int, list[int]] | None = None,
) -> ad.AnnData:
    """Cells of ``n_types`` types from ``n_donors`` donors with strong donor effects."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    donor_fx = np.exp(rng.normal(0.0, 0.8, size=(n_donors, n_genes)))
    counts, types, donors = [], [], []
    for t in range(n_types):
        mean = base.copy()
        mean[t * 4 : t * 4 + 4] += 10.0
        for d in (donors_of_type or {}).get(t, range(n_donors)):
            counts.append(rng.poisson(mean * donor_fx[d] * 4.0, size=(cells, n_genes)))
            types += [f"type_{t}"] * cells
            donors += [f"donor_{d}"] * cells
    C = np.vstack(counts).astype(np.float32)
    C[C.sum(axis=1) == 0, 0] = 1.0
    X = np.log1p(C / C.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(types), "donor_id": pd.Categorical(donors)},
        index=[f"cell{i}" for i in range(len(types))],
    )
    return ad.AnnData(
        sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    )


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return make_donor_adata()


# ---------------------------------------------------------------------------- recipe
def test_vectors_respect_sparsity_threshold_and_clip(adata):
    V = compute_augmentation_vectors(adata, seed=0, **SMALL)
    assert V.dtype == np.float32 and V.ndim == 2 and V.shape[1] == adata.n_vars
    assert 0 < V.shape[0] <= SMALL["n_vectors"]
    a = np.abs(V)
    assert not ((a > 0) & (a <= 0.25)).any(), "entries with 0 < |v| <= 0.25 must be zeroed"
    assert a.max() <= 1.5 + 1e-7
    assert np.isclose(a.max(), 1.5), "strong donor effects must hit the clip bound"
    assert (a > 0).any()


def test_vectors_are_same_type_donor_differences(adata):
    """Without thresholds every vector is mean(type, donor a) - mean(type, donor b)."""
    settings = {"zero_below": 0.0, "clip": 100.0, "n_clusters": 1, "min_cluster_size": 0}
    V = compute_augmentation_vectors(
        adata, seed=0, n_sample=adata.n_obs, n_vectors=10_000, **settings
    )
    X = adata.X.toarray().astype(np.float64)
    obs = adata.obs.astype(str)
    candidates = []
    for t in obs["cell_type"].unique():
        means = [
            X[((obs["cell_type"] == t) & (obs["donor_id"] == d)).to_numpy()].mean(axis=0)
            for d in sorted(obs.loc[obs["cell_type"] == t, "donor_id"].unique())
        ]
        for a, b in combinations(range(len(means)), 2):
            candidates += [means[a] - means[b], means[b] - means[a]]
    candidates = np.asarray(candidates)
    assert V.shape[0] == 3 * 10  # 3 types x C(5, 2) pairs, every pair kept
    for v in V:
        assert np.abs(candidates - v).max(axis=1).min() < 1e-4


def test_max_pairs_caps_vectors_per_type(adata):
    settings = {"n_clusters": 1, "min_cluster_size": 0, "n_vectors": 10_000}
    _, info = _compute(
        adata,
        label_key="cell_type",
        donor_key="donor_id",
        seed=0,
        n_sample=500_000,
        max_pairs=3,
        zero_below=0.25,
        clip=1.5,
        **settings,
    )
    assert info["pairs_per_type"] == {"type_0": 3, "type_1": 3, "type_2": 3}
    assert info["n_vectors"] == 9


def test_sampling_is_class_balanced():
    codes = np.array([0] * 900 + [1] * 100)
    w = _sample_weights(codes, 20_000, np.random.default_rng(0))
    assert w.sum() == 20_000
    share = w[codes == 1].sum() / w.sum()
    assert 0.45 < share < 0.55  # 10% of the cells, half of the draws
    w_all = _sample_weights(codes, len(codes), np.random.default_rng(0))
    assert (w_all == 1).all()  # n_sample == cells: every cell once (no replacement)


def test_deterministic_per_seed(adata):
    a = compute_augmentation_vectors(adata, seed=3, **SMALL)
    b = compute_augmentation_vectors(adata, seed=3, **SMALL)
    np.testing.assert_array_equal(a, b)


def test_too_few_donors_raises_clear_error():
    one_donor_each = make_donor_adata(donors_of_type={0: [0], 1: [1], 2: [2]})
    with pytest.raises(InputError) as exc:
        compute_augmentation_vectors(one_donor_each, **SMALL)
    assert exc.value.field == "donor_id"
    assert "2 or more donors" in str(exc.value) and exc.value.fix


def test_single_donor_type_gives_no_vectors(caplog):
    mixed = make_donor_adata(donors_of_type={0: [0], 1: [0, 1, 2], 2: [1, 2, 3]})
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        _, info = _compute(
            mixed,
            label_key="cell_type",
            donor_key="donor_id",
            seed=0,
            n_sample=1000,
            max_pairs=300,
            zero_below=0.25,
            clip=1.5,
            **SMALL,
        )
    assert info["single_donor_types"] == ["type_0"]
    assert info["pairs_per_type"]["type_0"] == 0
    assert "one donor only" in caplog.text and "type_0" in caplog.text


def test_missing_donor_column_raises(adata):
    bare = adata.copy()
    del bare.obs["donor_id"]
    with pytest.raises(InputError) as exc:
        compute_augmentation_vectors(bare, **SMALL)
    assert exc.value.field == "donor_id"


@pytest.mark.parametrize(
    "bad", [{"n_vectors": 0}, {"clip": 0.0}, {"zero_below": -1.0}, {"n_clusters": 2.5}]
)
def test_bad_settings_raise(adata, bad):
    with pytest.raises(InputError):
        compute_augmentation_vectors(adata, **{**SMALL, **bad})


def test_small_data_fallback_is_logged_and_not_empty(adata, caplog):
    with caplog.at_level(logging.WARNING, logger="celltype_bench"):
        V, info = _compute(
            adata,
            label_key="cell_type",
            donor_key="donor_id",
            seed=0,
            n_sample=2000,
            max_pairs=300,
            zero_below=0.25,
            clip=1.5,
            n_clusters=50,
            min_cluster_size=2000,
            n_vectors=5000,
        )
    assert info["fallback_mean_size"] is True
    assert info["n_clusters"] == 30  # at most one cluster per difference vector
    assert "no k-means cluster has more than min_cluster_size=2000" in caplog.text
    sizes = np.asarray(info["cluster_sizes"])
    kept = info["clusters_kept"]
    assert kept and all(sizes[c] >= sizes.mean() for c in kept)
    assert 0 < V.shape[0] == sizes[kept].sum()


def test_large_clusters_kept_and_small_dropped(adata):
    _, info = _compute(
        adata,
        label_key="cell_type",
        donor_key="donor_id",
        seed=0,
        n_sample=2000,
        max_pairs=300,
        zero_below=0.25,
        clip=1.5,
        n_clusters=5,
        min_cluster_size=6,
        n_vectors=10_000,
    )
    sizes = np.asarray(info["cluster_sizes"])
    assert not info["fallback_mean_size"]
    assert set(info["clusters_kept"]) == set(np.flatnonzero(sizes > 6).tolist())
    assert info["n_vectors"] == sizes[sizes > 6].sum()


# ---------------------------------------------------------------------------- DAG step
def _write_task(tmp_path, adata, name="data.h5ad"):
    rng = np.random.default_rng(0)
    roles = rng.choice(["train", "valid", "test"], size=adata.n_obs, p=[0.6, 0.2, 0.2])
    split = pd.DataFrame({"cell_id": adata.obs_names, "replicate": "r0", "role": roles})
    io.write_table(split, tmp_path / "split.parquet")
    io.write_h5ad(adata, tmp_path / name)
    return roles


def test_step_uses_training_cells_only(tmp_path, adata):
    roles = _write_task(tmp_path, adata)
    params = {"seed": 1, **SMALL}
    augmentation_step(
        str(tmp_path / "data.h5ad"),
        str(tmp_path / "split.parquet"),
        "r0",
        str(tmp_path / "a.npz"),
        params,
    )
    genes = list(adata.var_names)
    base = load_vectors(tmp_path / "a.npz", genes)

    changed = adata.copy()
    X = changed.X.toarray()
    held_out = roles != "train"
    X[held_out] = np.flip(X[held_out], axis=1) + 1.0  # very different test/valid cells
    changed.X = sp.csr_matrix(X)
    io.write_h5ad(changed, tmp_path / "changed.h5ad")
    augmentation_step(
        str(tmp_path / "changed.h5ad"),
        str(tmp_path / "split.parquet"),
        "r0",
        str(tmp_path / "b.npz"),
        params,
    )
    np.testing.assert_array_equal(base, load_vectors(tmp_path / "b.npz", genes))

    X2 = adata.X.toarray()
    X2[roles == "train"] *= 1.5  # a change of the training cells does change them
    changed.X = sp.csr_matrix(X2)
    io.write_h5ad(changed, tmp_path / "train_changed.h5ad")
    augmentation_step(
        str(tmp_path / "train_changed.h5ad"),
        str(tmp_path / "split.parquet"),
        "r0",
        str(tmp_path / "c.npz"),
        params,
    )
    assert not np.array_equal(base, load_vectors(tmp_path / "c.npz", genes))
    info = read_vectors_info(tmp_path / "a.npz")
    assert info["n_train_cells"] == int((roles == "train").sum()) and info["seed"] == 1


def test_step_rejects_unknown_setting(tmp_path, adata):
    _write_task(tmp_path, adata)
    with pytest.raises(InputError) as exc:
        augmentation_step(
            str(tmp_path / "data.h5ad"),
            str(tmp_path / "split.parquet"),
            "r0",
            str(tmp_path / "a.npz"),
            {"n_vector": 5},
        )
    assert "n_vector" in str(exc.value)


def test_step_error_names_the_data_file(tmp_path):
    one = make_donor_adata(donors_of_type={0: [0], 1: [1], 2: [2]})
    _write_task(tmp_path, one)
    with pytest.raises(InputError) as exc:
        augmentation_step(
            str(tmp_path / "data.h5ad"),
            str(tmp_path / "split.parquet"),
            "r0",
            str(tmp_path / "a.npz"),
            {},
        )
    assert exc.value.file == str(tmp_path / "data.h5ad") and exc.value.field == "donor_id"
    assert not (tmp_path / "a.npz").exists()


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_and_gene_checks(tmp_path):
    V = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    genes = ["a", "b", "c", "d"]
    path = tmp_path / "sub" / "v.npz"
    save_vectors(V, genes, path, info={"k": 1})
    assert [p.name for p in path.parent.iterdir()] == ["v.npz"]  # no temporary left
    np.testing.assert_array_equal(load_vectors(path, genes), V)
    assert read_vectors_info(path) == {"k": 1}
    with pytest.raises(InputError, match="different order"):
        load_vectors(path, ["b", "a", "c", "d"])
    with pytest.raises(InputError, match="missing"):
        load_vectors(path, ["a", "b", "c", "e"])
    with pytest.raises(InputError, match="does not exist"):
        load_vectors(tmp_path / "none.npz", genes)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load_vectors(tmp_path / "bad.npz", genes)


# ---------------------------------------------------------------------------- transform
def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_apply_clamps_to_0_9():
    x = torch.tensor([[0.1, 8.8, 4.0]] * 64)
    v = torch.tensor([[1.5, 1.5, 0.0]])
    out = apply_augmentation(x, v, _gen())
    assert out.min() >= 0.0 and out.max() <= 9.0
    assert (out[:, 0] == 0.0).any() and (out[:, 1] == 9.0).any()  # both bounds hit
    assert torch.equal(out[:, 2], x[:, 2])
    assert torch.equal(x, torch.tensor([[0.1, 8.8, 4.0]] * 64)), "input must not change"


def test_apply_random_signs_and_vectors():
    n = 400
    x = torch.full((n, 5), 4.0)
    vectors = torch.eye(5) * torch.arange(1, 6, dtype=torch.float32)[:, None] * 0.25
    delta = apply_augmentation(x, vectors, _gen(1)) - x
    nz = delta != 0
    assert (nz.sum(dim=1) == 1).all()  # each row got exactly one (one-hot) vector
    which = nz.float().argmax(dim=1)
    assert len(torch.unique(which)) == 5  # rows get different vectors
    sign = delta.sum(dim=1).sign()
    assert (sign > 0).sum() > 100 and (sign < 0).sum() > 100  # both signs, about half each
    assert torch.allclose(delta.abs().sum(dim=1), vectors[which].sum(dim=1))


def test_apply_is_deterministic_per_generator():
    x = torch.rand(50, 6) * 5
    v = torch.randn(10, 6)
    assert torch.equal(apply_augmentation(x, v, _gen(3)), apply_augmentation(x, v, _gen(3)))
    assert not torch.equal(apply_augmentation(x, v, _gen(3)), apply_augmentation(x, v, _gen(4)))
    with pytest.raises(ValueError):
        apply_augmentation(x, torch.randn(10, 5), _gen())
