"""On-disk CSR layout and the block-shuffled loader (celltype_bench.data.ondisk)."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from celltype_bench.balancing import epoch_indices
from celltype_bench.data.ondisk import (
    OnDiskAnnData,
    OnDiskCSR,
    OnDiskWriter,
    in_memory_mb,
    open_ondisk,
    open_run_data,
    open_training_matrix,
    read_ondisk_anndata,
    write_ondisk,
)
from celltype_bench.errors import InputError
from celltype_bench.methods import create
from celltype_bench.training import PREDICT_BYTES, fit_torch, iterate_minibatches
from celltype_bench.training import _macro_f1 as macro_f1

torch.set_num_threads(2)

SIZES = [400, 200, 100, 60, 40]  # imbalanced classes, stored in class order (worst case)


def make_adata(seed: int = 0, n_genes: int = 60, sizes=SIZES) -> ad.AnnData:
    """Cells of 5 imbalanced classes, sorted by class; X = log1p(CP10k) CSR float32."""
    base = np.random.default_rng(12345).gamma(1.0, 1.0, size=n_genes)  # same genes per seed
    rng = np.random.default_rng(seed)
    counts, labels = [], []
    for c, n in enumerate(sizes):
        mean = base.copy()
        mean[c * 5 : (c + 1) * 5] += 1.0
        counts.append(rng.poisson(mean * 3.0, size=(n, n_genes)))
        labels += [f"type_{c}"] * n
    counts = np.vstack(counts).astype(np.float32)
    lib = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    X = np.log1p(counts / lib * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts)
    return adata


def random_csr(n: int = 1000, m: int = 40, density: float = 0.2, seed: int = 0) -> sp.csr_matrix:
    X = sp.random(n, m, density=density, format="csr", dtype=np.float32, random_state=seed)
    X.data += 0.5
    return X


@pytest.fixture
def stored(tmp_path):
    X = random_csr()
    path = write_ondisk(X, tmp_path / "x.h5", chunk_rows=97, chunk_elems=512)
    return X, path


def collect(M: OnDiskCSR, y, batch_size, **kw):
    xs, ys = [], []
    for xb, yb in M.block_minibatches(y, batch_size, **kw):
        xs.append(xb.numpy().copy())
        ys.append(yb.numpy().copy())
    return xs, ys


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_round_trip_equals_the_in_memory_matrix(tmp_path, suffix):
    X = random_csr()
    chunks = (X[i : i + 123] for i in range(0, X.shape[0], 123))
    path = write_ondisk(chunks, tmp_path / f"x{suffix}", n_vars=X.shape[1], chunk_elems=256)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary name is gone
    with open_ondisk(path) as M:
        assert M.shape == X.shape and M.nnz == X.nnz
        full = M.to_memory()
        assert full.dtype == np.float32
        assert (full != X).nnz == 0
        rows = np.array([999, 3, 3, 500, 0, 42, 41])  # any order, repeats
        assert (M.read_rows(rows) != X[rows]).nnz == 0
        assert (M.read_block(100, 250) != X[100:250]).nnz == 0
        assert M.read_rows([]).shape == (0, X.shape[1])
        view = M[np.arange(5, 1000, 7)]
        assert view.shape == (len(range(5, 1000, 7)), X.shape[1])
        assert (view.read_rows([3, 0, 3]) != X[np.arange(5, 1000, 7)][[3, 0, 3]]).nnz == 0
        assert (view[2:9].to_memory() != X[np.arange(5, 1000, 7)][2:9]).nnz == 0


def test_file_is_an_h5ad_and_anndata_round_trips(tmp_path):
    adata = make_adata()
    path = write_ondisk(adata, tmp_path / "d.h5ad", chunk_rows=100)
    back = ad.read_h5ad(path)
    assert (back.X != adata.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    assert list(back.var_names) == list(adata.var_names)
    od = read_ondisk_anndata(path)
    assert od.shape == adata.shape
    assert list(od.obs_names) == list(adata.obs_names)
    sub = od[["cell5", "cell600"]]
    assert (sub.X.to_memory() != adata.X[[5, 600]]).nnz == 0
    assert list(sub.obs_names) == ["cell5", "cell600"]
    od.close()


def test_reads_an_anndata_written_h5ad_in_place(tmp_path):
    """The processed h5ad files (gzip-compressed CSR) are read without conversion."""
    adata = make_adata()
    adata.write_h5ad(tmp_path / "p.h5ad", compression="gzip")
    with open_ondisk(tmp_path / "p.h5ad") as M:
        assert (M.to_memory() != adata.X).nnz == 0
        assert (M.read_rows([7, 1]) != adata.X[[7, 1]]).nnz == 0


def test_writer_failure_leaves_no_file_and_bad_input_is_named(tmp_path):
    target = tmp_path / "x.h5"
    with pytest.raises(RuntimeError), OnDiskWriter(target, 40) as w:
        w.append(random_csr(10))
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="columns"), OnDiskWriter(target, 40) as w:
        w.append(random_csr(10, m=41))
    with h5py.File(tmp_path / "dense.h5", "w") as f:
        f.create_dataset("X", data=np.zeros((3, 4), np.float32))
    with pytest.raises(InputError, match="not as a CSR matrix"):
        open_ondisk(tmp_path / "dense.h5")
    with pytest.raises(InputError, match="does not exist"):
        open_ondisk(tmp_path / "missing.h5")


def test_views_need_increasing_rows(stored):
    _, path = stored
    with open_ondisk(path) as M:
        with pytest.raises(InputError, match="increasing"):
            M[np.array([5, 2])]
        assert M[np.arange(1000) % 2 == 0].shape[0] == 500


# ---------------------------------------------------------------------------- loader
def test_every_cell_exactly_once_per_epoch_with_the_right_rows(stored):
    X, path = stored
    M = open_ondisk(path, block_cells=50, buffer_blocks=3)  # 20 blocks, 7 buffers
    ids = np.arange(X.shape[0])
    xs, ys = collect(M, ids, 64, rng=np.random.default_rng(0))
    got = np.concatenate(ys)
    assert len(got) == X.shape[0]
    assert np.array_equal(np.sort(got), ids)  # each cell exactly once
    assert [len(y) for y in ys] == [64] * 15 + [40]  # batches run on across buffers
    for xb, yb in zip(xs, ys, strict=True):
        assert np.array_equal(xb, X[yb].toarray())
    # a trailing batch below min_batch is dropped, as in the in-memory loop
    _, ys2 = collect(M, ids, 333, rng=np.random.default_rng(0), min_batch=2)
    assert sum(map(len, ys2)) == 999


def test_reads_are_contiguous_whole_blocks_once_per_epoch(stored):
    X, path = stored
    M = open_ondisk(path, block_cells=50, buffer_blocks=4, record_reads=True)
    collect(M, np.arange(X.shape[0]), 32, rng=np.random.default_rng(1))
    log = M.stats.log
    assert M.stats.reads == len(log) <= M.n_blocks
    for first, stop in log:  # each read: whole blocks (adjacent ones merged)
        assert first % 50 == 0 and (stop % 50 == 0 or stop == X.shape[0])
    covered = np.concatenate([np.arange(a, b) for a, b in log])
    assert np.array_equal(np.sort(covered), np.arange(X.shape[0]))  # every row read once
    assert M.stats.rows == X.shape[0] and M.stats.nnz == X.nnz
    # blocks are visited in a shuffled order, not file order
    assert [a for a, _ in log] != sorted(a for a, _ in log)


def test_batches_are_mixed_across_blocks(stored):
    X, path = stored
    M = open_ondisk(path, block_cells=50, buffer_blocks=5)
    _, ys = collect(M, np.arange(X.shape[0]), 40, rng=np.random.default_rng(2))
    blocks_per_batch = [len(np.unique(y // 50)) for y in ys]
    assert min(blocks_per_batch) >= 3  # every batch draws on several blocks
    assert np.mean(blocks_per_batch) >= 4
    # ... of its own buffer (two buffers for a batch that straddles a buffer boundary)
    assert max(blocks_per_batch) <= 10
    # and the first batch does not start at the beginning of the file
    assert not set(ys[0] // 50) <= {0, 1, 2, 3, 4}


def test_same_seed_same_order_other_seed_other_order(stored):
    X, path = stored
    M = open_ondisk(path, block_cells=50, buffer_blocks=3)
    ids = np.arange(X.shape[0])
    a = np.concatenate(collect(M, ids, 64, rng=np.random.default_rng(7))[1])
    b = np.concatenate(collect(M, ids, 64, rng=np.random.default_rng(7))[1])
    c = np.concatenate(collect(M, ids, 64, rng=np.random.default_rng(8))[1])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_weighted_sampling_keeps_the_class_mix(tmp_path):
    """scBalance's draws (1/class size, with replacement) survive the block regrouping."""
    sizes = [3000, 600, 300, 100]
    y = np.repeat(np.arange(4), sizes)  # stored sorted by class: blocks are single-class
    X = sp.csr_matrix(np.eye(4, dtype=np.float32)[y])
    M = OnDiskCSR(write_ondisk(X, tmp_path / "w.h5"), block_cells=100, buffer_blocks=10)
    rng = np.random.default_rng(0)
    draws = epoch_indices(y, rng)  # what fit_torch passes in
    _, ys = collect(M, y, 128, indices=draws, rng=rng)
    got = np.concatenate(ys)
    assert np.array_equal(np.sort(got), np.sort(y[draws]))  # exactly the sampler's draws
    share = np.bincount(got, minlength=4) / len(got)
    assert np.allclose(share, 0.25, atol=0.03)  # about 1/k each, not 75 % class 0
    # batches mix classes although every block holds one class (how well depends on how many
    # blocks a buffer spans: 10 of 40 here)
    assert np.mean([len(np.unique(b)) for b in ys]) >= 2.5
    assert np.mean([np.bincount(b, minlength=4).max() / len(b) for b in ys]) < 0.7


def test_single_buffer_gives_exactly_the_in_memory_batches(stored):
    X, path = stored
    M = open_ondisk(path, block_cells=500, buffer_blocks=2)  # one buffer
    y = np.arange(X.shape[0]) % 5
    idx = np.random.default_rng(3).choice(X.shape[0], 1500)
    got = list(M.block_minibatches(y, 128, indices=idx, rng=np.random.default_rng(9)))
    want = list(iterate_minibatches(X, y, 128, indices=idx))
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)


def test_buffer_memory_is_bounded_by_buffer_mb(tmp_path):
    X = random_csr(4000, 50, density=0.2)  # about 10 values = 88 bytes a row
    M = OnDiskCSR(write_ondisk(X, tmp_path / "b.h5"), block_cells=100, buffer_mb=0.05)
    assert M.buffer_blocks == int(0.05 * 2**20 // (M.row_bytes * 100))
    loaded = []
    real = M._load_buffer

    def spy(blocks):
        buf, first = real(blocks)
        loaded.append(buf.data.nbytes + buf.indices.nbytes + buf.indptr.nbytes)
        return buf, first

    M._load_buffer = spy
    collect(M, np.zeros(4000, np.int64), 64, rng=np.random.default_rng(0))
    assert len(loaded) > 1 and max(loaded) <= 1.2 * 0.05 * 2**20


def test_fit_torch_on_disk_is_deterministic(stored):
    X, path = stored
    y = (X[:, 0].toarray().ravel() > 0).astype(np.int64)

    def weights():
        torch.manual_seed(0)
        model = torch.nn.Linear(X.shape[1], 2)
        M = open_ondisk(path, block_cells=50, buffer_blocks=3)
        fit_torch(
            model,
            M,
            y,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
            epochs=2,
            batch_size=64,
            seed=4,
            device="cpu",
        )
        return torch.cat([p.detach().ravel() for p in model.parameters()])

    assert torch.equal(weights(), weights())


# ---------------------------------------------------------------------------- methods
FAST = {
    "linear": {"batch_size": 64, "lr": 0.01, "epochs": 10, "device": "cpu", "seed": 0},
    "scbalance": {"epochs": 6, "device": "cpu", "seed": 0},
    "sctab": {
        "epochs": 20,
        "batch_size": 64,
        "n_d": 16,
        "n_a": 8,
        "n_shared": 1,
        "n_independent": 1,
        "virtual_batch_size": 32,
        "lr": 0.02,
        "gamma": 1.0,
        "augment": False,
        "patience": None,
        "device": "cpu",
        "seed": 0,
    },
    "mlp": {"epochs": 15, "batch_size": 64, "augment": False, "device": "cpu", "seed": 0},
}


@pytest.mark.parametrize("name", ["linear", "scbalance", "sctab", "mlp"])
def test_torch_method_on_disk_matches_in_memory(tmp_path, name):
    adata = make_adata()
    test = make_adata(seed=1)
    path = write_ondisk(adata, tmp_path / "train.h5ad")
    test_path = write_ondisk(test, tmp_path / "test.h5ad")
    mem = create(name, **FAST[name]).fit(adata)
    p_mem = mem.predict_proba(test)

    # one buffer: the same batches, so the same model and predictions
    one = read_ondisk_anndata(path, block_cells=len(adata))
    disk = create(name, **FAST[name]).fit(one)
    p_disk = disk.predict_proba(read_ondisk_anndata(test_path))
    pd.testing.assert_frame_equal(p_disk, p_mem)

    # small blocks: another order, about the same quality. The file is sorted by class, so
    # batches mix classes only through the buffer (here 20 blocks of 10 cells, 4 buffers);
    # fewer, larger blocks per buffer (e.g. 4 of 40) cost up to 0.2 macro F1 on this data.
    blocks = read_ondisk_anndata(path, block_cells=10, buffer_blocks=20)
    assert blocks.X.n_blocks == 80
    disk2 = create(name, **FAST[name]).fit(blocks)
    truth = test.obs["cell_type"].astype(str).to_numpy()
    f1_mem = macro_f1(truth, mem.predict(test))
    f1_disk = macro_f1(truth, disk2.predict(read_ondisk_anndata(test_path)))
    assert f1_mem > 0.8
    assert abs(f1_disk - f1_mem) <= 0.05


def test_prediction_on_disk_reads_bounded_batches(tmp_path):
    adata = make_adata(n_genes=2000)
    est = create("linear", batch_size=64, lr=0.01, epochs=1, device="cpu", seed=0).fit(adata)
    od = read_ondisk_anndata(write_ondisk(adata, tmp_path / "t.h5ad"), record_reads=True)
    proba = est.predict_proba(od)
    pd.testing.assert_frame_equal(proba, est.predict_proba(adata))
    max_rows = PREDICT_BYTES // (4 * 2000)
    log = od.X.stats.log
    assert len(log) == -(-len(adata) // max_rows)
    assert all(b - a <= max_rows for a, b in log)


# ---------------------------------------------------------------------------- budget switch
def test_memory_budget_switch_chooses_on_disk_above_the_budget(tmp_path):
    adata = make_adata(n_genes=500)
    path = tmp_path / "p.h5ad"
    adata.write_h5ad(path, compression="gzip")
    need = in_memory_mb(path)
    xb = adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes
    cb = sum(getattr(adata.layers["counts"], k).nbytes for k in ("data", "indices", "indptr"))
    assert need == pytest.approx((xb + cb) / 2**20)
    assert open_training_matrix(path, None) is None
    assert open_training_matrix(path, 0) is None
    assert open_training_matrix(path, need * 1.01) is None
    M = open_training_matrix(path, need * 0.99)
    assert isinstance(M, OnDiskCSR) and M.shape == adata.shape
    assert M.buffer_mb == 32.0  # a quarter of the budget, at least 32 MiB
    M.close()


def test_open_run_data_trains_a_replicate_from_disk(tmp_path, caplog):
    adata = make_adata(n_genes=200)
    path = tmp_path / "p.h5ad"
    adata.write_h5ad(path, compression="gzip")
    rng = np.random.default_rng(0)
    role = rng.choice(["train", "valid", "test"], size=len(adata), p=[0.7, 0.1, 0.2])
    split = tmp_path / "s.parquet"
    order = rng.permutation(len(adata))  # the split table in any order
    pd.DataFrame(
        {"cell_id": adata.obs_names[order], "replicate": "fold0", "role": role[order]}
    ).to_parquet(split)
    budget = in_memory_mb(path) / 2
    assert open_run_data(path, split, "fold0", None, method="linear") is None
    assert open_run_data(path, split, "fold0", budget * 10, method="linear") is None
    with caplog.at_level("WARNING", logger="celltype_bench"):
        assert open_run_data(path, split, "fold0", budget, method="celltypist") is None
        assert (
            open_run_data(path, split, "fold0", budget, method="linear", strategy="smote") is None
        )
    assert "trains from memory only" in caplog.text and "resamples" in caplog.text
    parts = open_run_data(path, split, "fold0", budget, method="linear", strategy="class_weight")
    assert all(isinstance(p, OnDiskAnnData) for p in parts.values())
    mem = {}
    for name in ("train", "valid", "test"):
        want = np.flatnonzero(role == name)  # cells in file order
        assert list(parts[name].obs_names) == list(adata.obs_names[want])
        assert (parts[name].X.to_memory() != adata.X[want]).nnz == 0
        mem[name] = adata[want].copy()
    assert parts["train"].X.n_blocks <= parts["train"].X.buffer_blocks  # one buffer here
    params = {"batch_size": 64, "lr": 0.01, "epochs": 3, "device": "cpu", "seed": 0}
    est = create("linear", **params).fit(parts["train"], parts["valid"])
    proba = est.predict_proba(parts["test"])
    assert list(proba.index) == list(parts["test"].obs_names)
    # the same cells in the same order in memory: the same model
    want = create("linear", **params).fit(mem["train"], mem["valid"]).predict_proba(mem["test"])
    pd.testing.assert_frame_equal(proba, want)
    with pytest.raises(InputError, match="no rows for replicate"):
        open_run_data(path, split, "fold9", budget, method="linear")
