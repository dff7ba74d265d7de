"""Apply a model trained by the benchmark to a user's own cells (``celltype-bench annotate``).

The query's raw counts (``layers['counts']`` if present, else ``X``) are normalised like the
training data (log1p of counts per 10,000), its genes aligned by name to the model's genes
(missing ones zero-filled and reported; below ``min_overlap`` the query is refused), and the
predicted label, its Cell Ontology id and an uncertainty (1 - max probability) are written
into ``obs``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from . import io
from .data.preprocess import align_genes, check_counts, log1p_cp10k
from .errors import InputError
from .methods import Method

log = logging.getLogger("celltype_bench")

OBS_LABEL = "predicted_cell_type"
OBS_CL = "predicted_cell_type_ontology_term_id"
OBS_UNCERTAINTY = "prediction_uncertainty"


def annotate(
    query: ad.AnnData,
    model: Method,
    *,
    min_overlap: float = 0.5,
    layer: str | None = None,
    source: str | None = None,
) -> ad.AnnData:
    """Predicted label, CL id and uncertainty for every cell of ``query`` (a new AnnData).

    ``layer``: where the raw counts are (default: ``layers['counts']`` if present, else X).
    """
    if layer is None:
        layer = "counts" if "counts" in query.layers else None
    counts = query.layers[layer] if layer is not None else query.X
    field = f"layers['{layer}']" if layer is not None else "X"
    if query.n_obs == 0:
        raise InputError("the query has no cells", file=source, field="obs")
    check_counts(counts, file=source, field=field)
    norm = ad.AnnData(
        X=log1p_cp10k(sp.csr_matrix(counts, dtype=np.float32)),
        obs=query.obs[[]].copy(),
        var=query.var[[]].copy(),
    )
    aligned = align_genes(norm, model.var_names_, min_overlap=min_overlap, source=source)
    info = aligned.uns["align_genes"]
    log.info(
        "query genes: %d of the model's %d found (%.1f%%); %d zero-filled, %d query genes unused",
        info["n_overlap"],
        info["n_target"],
        100 * info["share"],
        info["n_target"] - info["n_overlap"],
        info["n_data_genes_dropped"],
    )
    proba = model.predict_proba(aligned)
    labels = np.asarray(model.classes_, dtype=object)[proba.to_numpy().argmax(axis=1)]
    if hasattr(model, "uncertainty"):
        uncertainty = np.asarray(model.uncertainty(aligned), dtype=float)
    else:
        uncertainty = 1.0 - proba.to_numpy().max(axis=1)
    out = query.copy()
    out.obs[OBS_LABEL] = labels.astype(str)
    cl = getattr(model, "label_ontology_", {}) or {}
    out.obs[OBS_CL] = [cl.get(lab, "") for lab in labels]
    out.obs[OBS_UNCERTAINTY] = uncertainty
    out.uns["celltype_bench_annotate"] = {
        "method": model.name,
        "n_model_genes": int(info["n_target"]),
        "n_genes_found": int(info["n_overlap"]),
        "gene_overlap": float(info["share"]),
        "n_genes_zero_filled": int(info["n_target"] - info["n_overlap"]),
    }
    return out


def annotate_file(
    query: str | Path, model: str | Path, out: str | Path, *, min_overlap: float = 0.5
) -> ad.AnnData:
    """Read ``query`` (h5ad), load ``model`` (a saved method directory), write ``out``."""
    adata = io.read_h5ad(str(query))
    method = Method.load(model)
    result = annotate(adata, method, min_overlap=min_overlap, source=str(query))
    io.write_h5ad(result, str(out))
    return result
