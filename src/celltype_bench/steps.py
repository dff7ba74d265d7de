"""One function per DAG step: files in, files out. `scripts/` call these; tests call them too."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import io
from .contract import (
    REQUIRED_COLUMNS,
    make_predictions,
    read_predictions,
    uncertainty_of,
    write_predictions,
)
from .errors import InputError

LOGGER_NAME = "celltype_bench"


def setup_logging(log_path: str | None) -> logging.Logger:
    """Send the package logger (and warnings) to a rule's log file, one line per event."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler: logging.Handler
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, mode="w")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(handler)
    return logger


# ---- data --------------------------------------------------------------------------------
def fetch_dataset(source: dict[str, Any], out: str) -> None:
    """Produce data/raw/{dataset}.h5ad from a source spec (kind + parameters)."""
    from .data.sources import load_source, validate_raw

    log = logging.getLogger(LOGGER_NAME)
    spec = dict(source)
    kind = spec.pop("kind")
    log.info("fetching source %s with %s", kind, spec)
    adata = load_source(kind, **spec)
    validate_raw(adata, path=out)
    log.info(
        "raw dataset: %d cells x %d genes, %d labels",
        adata.n_obs,
        adata.n_vars,
        adata.obs["cell_type"].nunique(),
    )
    io.write_h5ad(adata, out)


def preprocess_dataset(
    raw: str,
    out: str,
    *,
    label_map: dict[str, str] | None = None,
    label_key: str = "cell_type",
    min_genes: int = 10,
) -> None:
    """Counts layer, log1p(CP10k) X, labels checked against the pinned Cell Ontology."""
    from .data.preprocess import preprocess
    from .ontology import load_ontology, map_labels

    log = logging.getLogger(LOGGER_NAME)
    adata = io.read_h5ad(raw)
    if label_key not in adata.obs:
        raise InputError(
            f"no label column '{label_key}' in obs (columns: {list(adata.obs.columns)})",
            file=raw,
            field=label_key,
            fix="set datasets.<name>.label_key in the config to the column holding author labels",
        )
    if label_key != "cell_type":
        adata.obs["cell_type"] = adata.obs[label_key]
    adata = preprocess(adata, min_genes=min_genes, source=raw)
    onto = load_ontology()
    mapping = dict(label_map or {})
    if "cell_type_ontology_term_id" in adata.obs:
        pairs = adata.obs[["cell_type", "cell_type_ontology_term_id"]].astype(str).drop_duplicates()
        for lab, cl in pairs.itertuples(index=False):
            if cl and cl.lower() not in ("nan", "unknown", "") and lab not in mapping:
                mapping[lab] = cl
    label_to_cl = map_labels(
        adata.obs["cell_type"].astype(str).unique(), mapping=mapping, ontology=onto, source=raw
    )
    adata.obs["cell_type_ontology_term_id"] = (
        adata.obs["cell_type"].astype(str).map(label_to_cl).astype("category")
    )
    adata.uns["cl_version"] = onto.version
    log.info(
        "processed: %d cells x %d genes; %d labels mapped to CL %s",
        adata.n_obs,
        adata.n_vars,
        len(label_to_cl),
        onto.version,
    )
    io.write_h5ad(adata, out)


def split_task(data: str, out: str, spec: dict[str, Any]) -> None:
    """Write the task's split table (cell_id, replicate, role)."""
    from .data.splits import make_split

    log = logging.getLogger(LOGGER_NAME)
    adata = io.read_h5ad(data)
    spec = dict(spec)
    tier = spec.pop("tier", None)
    split = make_split(adata.obs, spec)
    if tier:
        from .data.tiers import apply_tier

        donor_key = spec.get("donor_key", "donor_id")
        split = apply_tier(split, adata.obs, donor_key=donor_key, **tier)
        log.info("training tier: %s", tier)
    counts = split.groupby(["replicate", "role"]).size().unstack(fill_value=0)
    log.info("split %s:\n%s", spec, counts.to_string())
    io.write_table(split, out)


def load_run_data(data: str, split: str, replicate: str):
    """The processed dataset cut into train / valid / test AnnData for one replicate."""
    adata = io.read_h5ad(data)
    table = pd.read_parquet(split)
    table = table[table["replicate"] == replicate]
    if table.empty:
        raise InputError(
            f"no rows for replicate '{replicate}'",
            file=split,
            field="replicate",
            fix="rerun the split rule",
        )
    parts = {}
    # 'unlabeled': training cells left out of a labeled-cell tier (data.tiers), no labels used
    for role in ("train", "valid", "test", "unlabeled"):
        ids = table.loc[table["role"] == role, "cell_id"].astype(str).to_numpy()
        parts[role] = adata[ids].copy() if len(ids) else None
    if parts["train"] is None or parts["test"] is None:
        raise InputError(
            f"replicate '{replicate}' has no training or no test cells",
            file=split,
            field="role",
            fix="check the split settings of the task (fractions, number of folds)",
        )
    return parts


# ---- train and score ---------------------------------------------------------------------
def train_run(
    *,
    data: str,
    split: str,
    replicate: str,
    method: dict[str, Any],
    balancing: dict[str, Any],
    seed: int,
    out_predictions: str,
    out_run: str,
    out_model: str,
    out_history: str | None = None,
    threads: int = 1,
    augmentation: str | None = None,
    unlabeled_data: list[str] | None = None,
    checkpoint_dir: str | None = None,
    memory_budget_mb: float | None = None,
) -> None:
    """Fit one method with one balancing strategy on one replicate; predict its test cells.

    - ``augmentation``: the task's augmentation vectors (npz from the augmentation rule), for
      methods that augment.
    - A method with ``uses_unlabeled`` also gets the test cells' expression without any label
      column, plus the cells of ``unlabeled_data`` (processed h5ad files, genes aligned to
      the training genes, missing ones zero-filled).
    - ``memory_budget_mb``: when loading the processed h5ad (X + layers) would take more MiB
      than this, methods with ``supports_ondisk`` (linear, scbalance, sctab, mlp) train and predict with X
      read from disk (``celltype_bench.data.ondisk.open_run_data``); None: always in memory.
    - ``checkpoint_dir``: per-epoch checkpoints; a rerun after a kill resumes from them, and
      they are removed once the run's outputs are written.
    - ``out_history``: per-epoch history (loss, validation macro F1 / loss) as TSV.
    """
    import torch

    from . import balancing as bal
    from .methods import create, get

    log = logging.getLogger(LOGGER_NAME)
    torch.set_num_threads(max(1, threads))
    if method.get("module"):
        from .workflow_config import import_method_module

        import_method_module(method["module"])
    parts = None
    if memory_budget_mb:
        from .data.ondisk import open_run_data

        parts = open_run_data(
            data,
            split,
            replicate,
            memory_budget_mb,
            method=method["name"],
            strategy=bal.resolve(balancing["strategy"], method["name"]),
        )
    on_disk = parts is not None
    if parts is None:
        parts = load_run_data(data, split, replicate)
    strategy = balancing["strategy"]
    params = bal.configure(method["name"], dict(method.get("params", {})), strategy)
    if "seed" in get(method["name"]).default_params:
        params.setdefault("seed", seed)
    est = create(method["name"], **params)
    train, valid, test = parts["train"], parts["valid"], parts["test"]
    n_train_orig = int(train.n_obs)
    t0 = time.perf_counter()
    if strategy in bal.RESAMPLERS or strategy == "external":
        train = bal.resample_adata(
            train,
            strategy,
            seed=seed,
            external=balancing.get("class"),
            params=balancing.get("params"),
        )
        log.info(
            "balancing %s: %d -> %d training cells", balancing["name"], n_train_orig, train.n_obs
        )
    balance_s = time.perf_counter() - t0
    log.info(
        "method %s, balancing %s, params %s: train %d, valid %d, test %d cells",
        method["name"],
        balancing["name"],
        params,
        train.n_obs,
        0 if valid is None else valid.n_obs,
        test.n_obs,
    )
    fit_kwargs: dict[str, Any] = {}
    if augmentation:
        from .augmentation import load_vectors

        fit_kwargs["augmentation"] = load_vectors(augmentation, list(map(str, train.var_names)))
    n_unlabeled = 0
    if est.uses_unlabeled:
        pool = parts.get("unlabeled")
        fit_kwargs["unlabeled"] = unlabeled_cells(
            test, unlabeled_data or [], train.var_names, pool=pool
        )
        n_unlabeled = int(fit_kwargs["unlabeled"].n_obs)
        n_pool = 0 if pool is None else int(pool.n_obs)
        log.info(
            "%s learns from unlabeled cells: %d (the %d test cells, without labels, + %d "
            "training cells left out of a labeled-cell tier + %d from %s)",
            method["name"],
            n_unlabeled,
            test.n_obs,
            n_pool,
            n_unlabeled - test.n_obs - n_pool,
            unlabeled_data or "no extra dataset",
        )
    if checkpoint_dir:
        fit_kwargs["checkpoint_dir"] = checkpoint_dir
    t0 = time.perf_counter()
    est.fit(train, valid, **fit_kwargs)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    proba = est.predict_proba(test)
    uncertainty = est.uncertainty(test) if hasattr(est, "uncertainty") else None
    predict_s = time.perf_counter() - t0
    est.save(out_model)
    pred = make_predictions(
        test.obs_names, test.obs["cell_type"].astype(str), proba, uncertainty=uncertainty
    )
    write_predictions(pred, out_predictions)
    if out_history:
        io.write_table(history_table(est.history_), out_history)
    info = {
        "method": method["name"],
        "params": params,
        "seed": seed,
        "replicate": replicate,
        "balancing": balancing["name"],
        "n_train": n_train_orig,
        "n_train_balanced": int(train.n_obs),
        "n_valid": 0 if valid is None else int(valid.n_obs),
        "n_test": int(test.n_obs),
        "balance_seconds": balance_s,
        "fit_seconds": fit_s,
        "predict_seconds": predict_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "uses_unlabeled": bool(getattr(est, "uses_unlabeled", False)),
        "n_unlabeled": n_unlabeled,
        "augmented": bool(augmentation),
        "n_parameters": count_parameters(est),
        "on_disk": on_disk,
        "history": getattr(est, "history_", None),
    }
    io.write_json(info, out_run)
    log.info(
        "fit %.2fs, predict %.2fs, accuracy on test %.4f",
        fit_s,
        predict_s,
        float((pred["predicted_label"] == pred["true_label"]).mean()),
    )
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


FAILED = "failed"


def count_parameters(est: Any) -> int | None:
    """Trainable parameters of a fitted estimator (None for methods without a torch module).

    ``est.n_parameters_`` wins when a method sets it (e.g. an ensemble sums its members);
    otherwise the parameters of ``est.module_`` are counted.
    """
    n = getattr(est, "n_parameters_", None)
    if n is not None:
        return int(n)
    module = getattr(est, "module_", None)
    if module is None or not hasattr(module, "parameters"):
        return None
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def train_or_record(*, on_failure: str = "record", log_file: str | None = None, **kwargs) -> None:
    """:func:`train_run`, but with ``on_failure: record`` a crashing method does not stop the
    workflow: the run is written as failed (``run.json`` with ``status: failed``, the error
    and the tail of the log; a predictions file with no rows) so scoring, tables and the
    report list it instead of dropping it. ``stop`` re-raises (Snakemake then marks the job
    failed; other jobs go on under ``--keep-going``). A kill (SIGKILL, Ctrl-C) is never
    recorded: the rerun resumes from the last checkpoint.
    """
    if on_failure not in ("record", "stop"):
        raise InputError(
            f"unknown on_failure '{on_failure}'", field="on_failure", fix="use record or stop"
        )
    try:
        train_run(**kwargs)
    except Exception as exc:
        if on_failure == "stop":
            raise
        log = logging.getLogger(LOGGER_NAME)
        log.exception("run failed; recorded as failed (on_failure: record)")
        for h in log.handlers:
            h.flush()
        write_failed_run(kwargs, exc, log_tail(log_file))


def log_tail(log_path: str | None, n_lines: int = 30) -> str:
    """The last lines of a log file ('' if there is none)."""
    if not log_path or not Path(log_path).exists():
        return ""
    lines = Path(log_path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-n_lines:])


def write_failed_run(kwargs: dict[str, Any], exc: BaseException, tail: str) -> None:
    """Write every output of a train job as a recorded failure (predictions with no rows)."""
    empty = pd.DataFrame({c: pd.Series(dtype=str) for c in REQUIRED_COLUMNS})
    write_predictions(empty, kwargs["out_predictions"], failed=True)
    Path(kwargs["out_model"]).mkdir(parents=True, exist_ok=True)
    if kwargs.get("out_history"):
        io.write_table(history_table(None), kwargs["out_history"])
    io.write_json(
        {
            "status": FAILED,
            "method": kwargs["method"]["name"],
            "balancing": kwargs["balancing"]["name"],
            "replicate": kwargs["replicate"],
            "seed": kwargs["seed"],
            "error": f"{type(exc).__name__}: {exc}",
            "log_tail": tail,
        },
        kwargs["out_run"],
    )


HISTORY_COLUMNS = ["epoch", "loss", "val_macro_f1", "val_loss", "seconds", "cells_per_s", "lr"]


def history_table(history: list[dict[str, Any]] | None) -> pd.DataFrame:
    """Per-epoch history as a table (empty, with the standard columns, for one-shot methods)."""
    df = pd.DataFrame(list(history or []))
    for col in HISTORY_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=float)
    extra = [c for c in df.columns if c not in HISTORY_COLUMNS]
    return df[HISTORY_COLUMNS + extra]


def unlabeled_cells(test, extra_paths: list[str], genes, pool=None) -> Any:
    """The cells a ``uses_unlabeled`` method may learn from: test cells + extra datasets.

    ``pool``: the training cells left out of a labeled-cell tier (split role ``unlabeled``),
    domain ``training`` (they come from the training cells' distribution).

    Only expression and non-label annotations are kept (``obs`` columns ``batch``,
    ``donor_id``, ``study``, ``tissue``, ``assay``) plus ``domain`` (``query`` for the test
    cells, the dataset's file stem for extra data); no label column survives.
    """
    import anndata as ad

    from .data.preprocess import align_genes

    keep = ["batch", "donor_id", "study", "tissue", "assay"]

    def strip(a, domain: str):
        obs = a.obs[[c for c in keep if c in a.obs]].copy()
        obs["domain"] = domain
        return ad.AnnData(X=a.X, obs=obs, var=pd.DataFrame(index=a.var_names))

    parts = [strip(test, "query")]
    if pool is not None:
        parts.append(strip(pool, "training"))
    for path in extra_paths:
        extra = align_genes(io.read_h5ad(path), list(map(str, genes)), source=path)
        parts.append(strip(extra, Path(path).stem))
    if len(parts) == 1:
        return parts[0]
    return ad.concat(parts, join="outer", index_unique="-", merge=None)


def score_run(
    *,
    predictions: str,
    data: str,
    split: str,
    replicate: str,
    out: str,
    rare_fraction: float = 0.05,
) -> None:
    """Score one predictions file: plain and ontology-corrected metrics, per-class F1."""
    from .metrics import score_predictions, uncertainty_summary
    from .ontology import load_ontology

    run_json = Path(predictions).with_name("run.json")
    run_info = json.loads(run_json.read_text()) if run_json.exists() else {}
    if run_info.get("status") == FAILED:
        logging.getLogger(LOGGER_NAME).warning("run failed in training: %s", run_info["error"])
        io.write_json(
            {
                "status": FAILED,
                "error": run_info.get("error"),
                "log_tail": run_info.get("log_tail", ""),
                "per_class": [],
            },
            out,
        )
        return
    pred = read_predictions(predictions)
    obs = io.read_obs(data)
    for col in ("cell_type", "cell_type_ontology_term_id"):
        if col not in obs:
            raise InputError(
                f"the processed dataset has no obs column '{col}'",
                file=data,
                field=col,
                fix="delete it and rerun the 'preprocess' rule that writes it",
            )
    label_to_cl = (
        obs[["cell_type", "cell_type_ontology_term_id"]]
        .astype(str)
        .drop_duplicates()
        .set_index("cell_type")["cell_type_ontology_term_id"]
        .to_dict()
    )
    table = io.read_table(split)
    for col in ("cell_id", "replicate", "role"):
        if col not in table:
            raise InputError(
                f"the split table has no column '{col}'",
                file=split,
                field=col,
                fix="delete it and rerun the 'split' rule that writes it",
            )
    train_ids = table.loc[
        (table["replicate"] == replicate) & (table["role"] == "train"), "cell_id"
    ].astype(str)
    stale = ~train_ids.isin(obs.index)
    if stale.any():
        raise InputError(
            f"{int(stale.sum())} training cells of replicate '{replicate}' are not in the "
            f"dataset (e.g. '{train_ids[stale].iloc[0]}'); the split is stale",
            file=split,
            field="cell_id",
            fix="delete it and rerun the 'split' rule that writes it",
        )
    train_counts = obs.loc[train_ids, "cell_type"].astype(str).value_counts().to_dict()
    missing = sorted(set(pred["cell_id"]) - set(obs.index))
    if missing:
        raise InputError(
            f"{len(missing)} predicted cells are not in the dataset (e.g. '{missing[0]}')",
            file=predictions,
            field="cell_id",
            fix="write the obs names of the processed dataset's test cells",
        )
    scores = score_predictions(pred, label_to_cl, train_counts, load_ontology(), source=predictions)
    scores.update(rare_class_f1(scores["per_class"], train_counts, rare_fraction))
    scores.update(test_log_loss(pred))
    scores.update(
        uncertainty_summary(
            (pred["predicted_label"] == pred["true_label"]).to_numpy(), uncertainty_of(pred)
        )
    )
    logging.getLogger(LOGGER_NAME).info(
        "macro F1 %.4f (ontology-corrected %.4f), accuracy %.4f, ECE %.4f",
        scores["macro_f1"],
        scores["macro_f1_ontology"],
        scores["accuracy"],
        scores["ece"],
    )
    io.write_json(scores, out)


def test_log_loss(pred: pd.DataFrame) -> dict[str, Any]:
    """Mean cross-entropy -log p(true label) over test cells whose label the method knows
    (scTab's test loss; cells of classes unseen in training are left out and counted)."""
    from .contract import PROBA_PREFIX

    cols = {c[len(PROBA_PREFIX) :]: c for c in pred.columns if str(c).startswith(PROBA_PREFIX)}
    known = pred["true_label"].astype(str).isin(cols)
    if not known.any():
        return {"test_loss": None, "n_test_unseen_class": int(len(pred))}
    sub = pred[known]
    names = list(cols)
    P = sub[[cols[c] for c in names]].to_numpy(dtype=float)
    idx = pd.Index(names).get_indexer(sub["true_label"].astype(str))
    p = P[np.arange(len(sub)), idx]
    return {
        "test_loss": float(-np.log(np.clip(p, 1e-12, None)).mean()),
        "n_test_unseen_class": int((~known).sum()),
    }


def rare_class_f1(
    per_class: list[dict[str, Any]], train_counts: dict[str, int], rare_fraction: float
) -> dict[str, Any]:
    """Mean F1 over rare test classes: fewer than ``rare_fraction`` of training cells (scBalance)."""
    total = sum(train_counts.values())
    rare = [
        pc for pc in per_class if total and train_counts.get(pc["label"], 0) < rare_fraction * total
    ]
    return {
        "rare_f1": float(np.mean([pc["f1"] for pc in rare])) if rare else None,
        "n_rare_classes": len(rare),
        "rare_fraction": rare_fraction,
    }


# ---- tables ------------------------------------------------------------------------------
SCORE_COLUMNS = [
    "accuracy",
    "macro_f1",
    "macro_f1_ontology",
    "rare_f1",
    "n_rare_classes",
    "weighted_f1",
    "ece",
    "test_loss",
    "error_auroc",
    "mean_uncertainty",
    "n_test",
]


def _read_benchmark(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    row = pd.read_csv(path, sep="\t").iloc[0]
    return {"wall_seconds": float(row["s"]), "max_rss_mb": float(row["max_rss"])}


def aggregate(
    *,
    score_paths: list[str],
    runs: list[dict[str, str]],
    methods: dict[str, dict[str, Any]],
    out_scores: str,
    out_per_class: str,
    out_summary: str,
    out_runtime: str,
    out_history: str | None = None,
    out_uncertainty: str | None = None,
    out_failed: str | None = None,
) -> None:
    """Collect every run's scores into tables: per run, per class, per task x method, runtime,
    per-epoch training history and accuracy per uncertainty bin."""
    rows, per_class, runtime, histories, unc, failed = [], [], [], [], [], []
    for path, run in zip(score_paths, runs, strict=True):
        scores = json.loads(Path(path).read_text())
        if scores.get("status") == FAILED:
            failed.append(
                {**run, "error": scores.get("error"), "log_tail": scores.get("log_tail", "")}
            )
            continue
        meta = methods.get(run["method"], {})
        base = dict(run)
        base["control"] = bool(meta.get("control", False))
        base["uses_unlabeled"] = bool(meta.get("uses_unlabeled", False))
        base["placeholder"] = bool(meta.get("placeholder", False))
        rows.append({**base, **{k: scores.get(k) for k in SCORE_COLUMNS}})
        for pc in scores["per_class"]:
            per_class.append({**run, **pc})
        for b in scores.get("uncertainty_bins", []):
            unc.append({**run, **b})
        hist = Path(path).with_name("history.tsv")
        if hist.exists() and hist.stat().st_size:
            h = pd.read_csv(hist, sep="\t")
            if not h.empty:
                histories.append(h.assign(**run))
        run_json = Path(path).with_name("run.json")
        info = json.loads(run_json.read_text()) if run_json.exists() else {}
        bench = _read_benchmark(
            Path("results/benchmarks/train")
            / run["task"]
            / run["method"]
            / run["balancing"]
            / f"{run['replicate']}.tsv"
        )
        runtime.append(
            {
                **run,
                "n_train": info.get("n_train"),
                "n_train_balanced": info.get("n_train_balanced"),
                "balance_seconds": info.get("balance_seconds"),
                "fit_seconds": info.get("fit_seconds"),
                "predict_seconds": info.get("predict_seconds"),
                "peak_rss_mb": info.get("peak_rss_mb"),
                "model": info.get("method"),
                "n_parameters": info.get("n_parameters"),
                **bench,
            }
        )
    scores_df = pd.DataFrame(rows)
    if out_failed:
        cols = ["task", "method", "balancing", "replicate", "error", "log_tail"]
        io.write_table(pd.DataFrame(failed).reindex(columns=cols), out_failed)
    if failed:
        logging.getLogger(LOGGER_NAME).warning(
            "%d runs failed (listed in the report and %s)", len(failed), out_failed
        )
    if out_history:
        cols = ["task", "method", "balancing", "replicate", *HISTORY_COLUMNS]
        hist_df = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
        io.write_table(hist_df.reindex(columns=cols), out_history)
    if out_uncertainty:
        cols = ["task", "method", "balancing", "replicate", "lo", "hi", "n", "accuracy"]
        io.write_table(pd.DataFrame(unc).reindex(columns=cols), out_uncertainty)
    io.write_table(scores_df, out_scores)
    io.write_table(pd.DataFrame(per_class), out_per_class)
    io.write_table(pd.DataFrame(runtime), out_runtime)
    io.write_table(summarise(scores_df), out_summary)


def concat_tables(*, inputs: dict[str, list[str]], outputs: dict[str, str]) -> None:
    """Concatenate same-named per-task tables into one table per name (``summary`` is
    re-sorted by task, then macro F1)."""
    for name, paths in inputs.items():
        frames = []
        for path in paths:
            try:
                frames.append(pd.read_csv(path))
            except pd.errors.EmptyDataError:
                continue
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if name == "summary" and not df.empty:
            df = df.sort_values(["task", "macro_f1_mean"], ascending=[True, False])
        io.write_table(df, outputs[name])


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over replicates per task x method x balancing."""
    keys = [
        k
        for k in ["task", "method", "balancing", "control", "uses_unlabeled", "placeholder"]
        if k in scores
    ]
    metrics = [
        m
        for m in ["macro_f1", "macro_f1_ontology", "rare_f1", "accuracy", "ece", "test_loss"]
        if m in scores
    ]
    g = scores.groupby(keys, observed=True)[metrics]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_sd")).reset_index()
    out["n_replicates"] = g.size().to_numpy()
    return out.sort_values(["task", "macro_f1_mean"], ascending=[True, False]).reset_index(
        drop=True
    )


def failed_runs_html(failed: str | None) -> str:
    """An HTML section listing failed runs with the tail of their log ('' if none failed)."""
    if not failed or not Path(failed).exists() or Path(failed).stat().st_size == 0:
        return ""
    df = pd.read_csv(failed).fillna("")
    if df.empty:
        return ""
    import html as html_lib

    items = []
    for _, r in df.iterrows():
        run = f"{r['task']} / {r['method']} / {r['balancing']} / {r['replicate']}"
        items.append(
            f"<h3>{html_lib.escape(run)}</h3><p><b>{html_lib.escape(str(r['error']))}</b></p>"
            f"<pre style='background:#f6f6f6;padding:6px;font-size:11px'>"
            f"{html_lib.escape(str(r['log_tail']))}</pre>"
        )
    return (
        f"<h2 style='color:#b00'>Failed runs ({len(df)})</h2>"
        "<p>These runs crashed and are not in the scores above (table "
        "<code>results/tables/failed_runs.csv</code>). After fixing the cause, "
        "<code>make retry-failed</code> reruns them.</p>" + "".join(items)
    )


def summary_html(summary: str, out: str, failed: str | None = None) -> None:
    """The summary table (and any failed runs) as a small standalone HTML page for the report."""
    df = pd.read_csv(summary)
    fmt = df.copy()
    for m in ["macro_f1", "macro_f1_ontology", "rare_f1", "accuracy", "ece"]:
        fmt[m] = [
            f"{a:.3f} ± {b:.3f}" if np.isfinite(b) else f"{a:.3f}"
            for a, b in zip(df[f"{m}_mean"], df[f"{m}_sd"], strict=True)
        ]
    fmt = fmt[
        [
            "task",
            "method",
            "balancing",
            "control",
            "uses_unlabeled",
            *(["placeholder"] if "placeholder" in fmt else []),
            "n_replicates",
            "macro_f1",
            "macro_f1_ontology",
            "rare_f1",
            "accuracy",
            "ece",
        ]
    ]
    html = (
        "<html><head><meta charset='utf-8'><title>celltype-bench scores</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        "<h2>Scores (mean ± sd over replicates)</h2>"
        "<p>Controls (majority class, random labels) anchor each task. 'macro_f1_ontology' counts a "
        "prediction of the true type or one of its descendants as right (scTab's rule); 'rare_f1' is "
        "the mean F1 of classes with under 5% of the training cells (scBalance's definition, "
        "configurable).</p>"
        + fmt.to_html(index=False, border=0)
        + failed_runs_html(failed)
        + "</body></html>"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(html)
    tmp.replace(out)


def run_logged(log_path: str | None, step, **kwargs) -> None:
    """Run a step with the package logger sent to the rule's log; errors land in the log too."""
    logger = setup_logging(log_path)
    try:
        step(**kwargs)
    except Exception:
        logger.exception("step %s failed", step.__name__)
        raise


def balancing_tests(*, scores: str, out: str) -> None:
    """Paired tests of each balancing strategy against the best alternative, per task x method."""
    from .stats import paired_strategy_tests

    io.write_table(paired_strategy_tests(pd.read_csv(scores)), out)


def balancing_runtime_sweep(
    *,
    sizes: list[int],
    strategies: list[str],
    out: str,
    seed: int = 0,
    repeats: int = 1,
    repeat_max_cells: int | None = None,
) -> None:
    """Time each strategy on nested census-like subsets of increasing size (scBalance Fig. 1d).

    Each size is timed ``repeats`` times (median) up to ``repeat_max_cells`` cells, once above.
    """
    from .balancing import time_strategies
    from .data.preprocess import preprocess
    from .data.sources import generate_census_like

    log = logging.getLogger(LOGGER_NAME)
    sizes = sorted(int(s) for s in sizes)
    log.info("generating a census-like corpus of %d cells", sizes[-1])
    adata = preprocess(generate_census_like(n_cells=sizes[-1], seed=seed), min_genes=1)
    codes, _ = pd.factorize(adata.obs["cell_type"].astype(str), sort=True)
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    frames = []
    for n in sizes:
        idx = np.sort(order[: min(n, adata.n_obs)])
        X, y = adata.X[idx], codes[idx]
        r = repeats if repeat_max_cells is None or len(idx) <= repeat_max_cells else 1
        t = time_strategies(X, y, strategies, seed=seed, repeats=r)
        t["repeats"] = r
        log.info("%d cells:\n%s", len(idx), t.to_string(index=False))
        frames.append(t)
    io.write_table(pd.concat(frames, ignore_index=True), out)
