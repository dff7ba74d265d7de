"""The CELLxGENE census as a source, with scTab's selection recipe (census LTS 2023-05-15).

Recipe (defaults are the paper's; every threshold is a parameter):

1. cells: ``is_primary_data == True`` and ``assay`` in the seven 10x assays
   (:data:`~celltype_bench.data.sources.SCTAB_10X_ASSAYS`);
2. donor unit: ``dataset_id + "_" + donor_id``;
3. cell types (by ``cell_type_ontology_term_id``): descendants of ``root`` ("native cell",
   CL:0000003) with at least ``min_cells`` cells (5,000), seen in more than ``donors_above``
   donors (30) and with more than ``ancestors_above`` ontology ancestors (7);
4. genes: a gene list (Ensembl ids matched against ``var.feature_id``; scTab's 19,331
   protein-coding genes) or all genes;
5. optional ``max_cells_per_type``: a seeded random cap per type, for a laptop-sized slice.

Ontology: the pinned Cell Ontology (:mod:`celltype_bench.ontology`, CL v2026-03-26). There
"native cell" is obsolete (replaced by CL:0000000 "cell"): an obsolete ``root`` is replaced by
its ``replaced_by`` term and the descendants of ``exclude`` ("cell in vitro", CL:0001034) are
left out, which keeps the meaning "cells as found in an organism". Ancestors mix ``is_a`` and
``part_of`` edges in that release, so ancestor counts differ from scTab's 2023 ontology;
``cell_types`` (a list or a file of census labels, e.g. scTab's 164) replaces steps 3's
ontology criteria when the exact published type list is wanted (the cell and donor
thresholds still apply).

Reading: ``obs`` is read first (filtered server-side), the cell types are decided on it, then
``X`` is fetched through :func:`cellxgene_census.get_anndata` in chunks of ``chunk_cells``
cells (``obs_coords`` = soma_joinids), so memory is bounded by one chunk plus the result.
``uri`` opens any SOMA store laid out like the census (the tests write one with tiledbsoma).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError

log = logging.getLogger("celltype_bench")

CENSUS_VERSION = "2023-05-15"
NATIVE_CELL = "CL:0000003"
CELL_IN_VITRO = "CL:0001034"
OBS_COLUMNS = (
    "soma_joinid",
    "cell_type",
    "cell_type_ontology_term_id",
    "dataset_id",
    "donor_id",
    "assay",
    "tissue_general",
    "is_primary_data",
)


def _names(value: str | os.PathLike | Sequence[str] | None, what: str) -> list[str] | None:
    """A list given inline or as a file with one entry per line ('#' comments allowed)."""
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if not path.exists():
            raise InputError(f"{what} file does not exist", file=str(path), field=f"source.{what}")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        return [line for line in lines if line]
    return [str(v) for v in value]


def _filter(assays: Sequence[str], primary_only: bool) -> str:
    quoted = ", ".join('"' + a.replace('"', '\\"') + '"' for a in assays)
    cond = f"assay in [{quoted}]"
    return f"is_primary_data == True and {cond}" if primary_only else cond


def select_cell_types(
    obs: pd.DataFrame,
    *,
    root: str = NATIVE_CELL,
    exclude: Sequence[str] = (CELL_IN_VITRO,),
    min_cells: int = 5000,
    donors_above: int = 30,
    ancestors_above: int = 7,
    cell_types: Sequence[str] | None = None,
    ontology: Any = None,
) -> pd.DataFrame:
    """One row per cell type id with its counts and the verdict of every criterion.

    ``obs`` needs ``cell_type_ontology_term_id``, ``cell_type`` and ``donor`` (the donor
    unit). Columns: label, n_cells, n_donors, n_ancestors, in_root, enough_cells,
    enough_donors, enough_ancestors, keep.
    """
    from ..ontology import load_ontology

    onto = ontology if ontology is not None else load_ontology()
    root_id = onto.term_id(root)
    if onto.is_obsolete(root_id):
        repl = [t for t in onto.replaced_by(root_id) if t in onto and not onto.is_obsolete(t)]
        if not repl:
            raise InputError(
                f"root {root} is obsolete in CL {onto.version} without a replacement",
                field="source.root",
                fix="give a current CL term as root",
            )
        log.warning(
            "root %s (%s) is obsolete in CL %s; using its replacement %s (%s) without the "
            "descendants of %s",
            root_id,
            onto.label(root_id),
            onto.version,
            repl[0],
            onto.label(repl[0]),
            list(exclude),
        )
        root_id = repl[0]
    inside = onto.descendants(root_id, include_self=True)
    for term in exclude:
        inside = inside - onto.descendants(onto.term_id(term), include_self=True)
    grouped = obs.groupby("cell_type_ontology_term_id", observed=True)
    table = pd.DataFrame(
        {
            "label": grouped["cell_type"].agg(lambda s: s.astype(str).value_counts().index[0]),
            "n_cells": grouped.size(),
            "n_donors": grouped["donor"].nunique(),
        }
    )
    table.index = table.index.astype(str)
    table["n_ancestors"] = [
        len(onto.ancestors(t)) if t in onto else -1 for t in table.index.astype(str)
    ]
    if cell_types is None:
        table["in_root"] = [t in inside for t in table.index]
        table["enough_ancestors"] = table["n_ancestors"] > int(ancestors_above)
    else:
        wanted = set(cell_types)
        table["in_root"] = [(lab in wanted or t in wanted) for t, lab in table["label"].items()]
        table["enough_ancestors"] = True
    table["enough_cells"] = table["n_cells"] >= int(min_cells)
    table["enough_donors"] = table["n_donors"] > int(donors_above)
    table["keep"] = (
        table["in_root"]
        & table["enough_cells"]
        & table["enough_donors"]
        & table["enough_ancestors"]
    )
    return table.sort_index()


def _read_genes(exp: Any, measurement: str, genes: list[str] | None) -> pd.DataFrame:
    var = (
        exp.ms[measurement]
        .var.read(column_names=["soma_joinid", "feature_id", "feature_name"])
        .concat()
        .to_pandas()
    )
    if genes is None:
        return var.sort_values("soma_joinid")
    wanted = pd.Index(genes)
    found = var[var["feature_id"].isin(wanted)]
    missing = len(set(wanted) - set(found["feature_id"]))
    if missing:
        log.warning("census: %d of %d requested genes are not in the census", missing, len(wanted))
    if found.empty:
        raise InputError(
            "none of the requested genes is in the census (matched on var.feature_id)",
            field="source.genes",
            fix="give Ensembl gene ids (ENSG...) as the gene list",
        )
    return found.sort_values("soma_joinid")


def load_census(
    *,
    census_version: str = CENSUS_VERSION,
    uri: str | None = None,
    organism: str = "Homo sapiens",
    measurement: str = "RNA",
    assays: Sequence[str] | None = None,
    primary_only: bool = True,
    root: str = NATIVE_CELL,
    exclude: Sequence[str] = (CELL_IN_VITRO,),
    min_cells: int = 5000,
    donors_above: int = 30,
    ancestors_above: int = 7,
    cell_types: str | Sequence[str] | None = None,
    genes: str | Sequence[str] | None = None,
    max_cells_per_type: int | None = None,
    seed: int = 0,
    chunk_cells: int = 100_000,
) -> ad.AnnData:
    """Cells of the census selected by scTab's recipe, as raw counts in the standard shape."""
    import cellxgene_census

    from .sources import SCTAB_10X_ASSAYS

    assays = list(SCTAB_10X_ASSAYS if assays is None else assays)
    gene_list = _names(genes, "genes")
    type_list = _names(cell_types, "cell_types")
    where = uri or f"census {census_version}"
    try:
        census = (
            cellxgene_census.open_soma(uri=uri)
            if uri
            else cellxgene_census.open_soma(census_version=census_version)
        )
    except Exception as exc:  # tiledbsoma raises several unrelated types for a bad store
        raise InputError(
            f"cannot open the census ({type(exc).__name__}: {exc})",
            file=where,
            field="source.uri" if uri else "source.census_version",
            fix="check the census version / URI and the network",
        ) from exc
    with census:
        key = organism.lower().replace(" ", "_")
        try:
            exp = census["census_data"][key]
        except KeyError as exc:
            raise InputError(
                f"the census has no organism '{organism}'",
                file=where,
                field="source.organism",
                fix="use 'Homo sapiens'",
            ) from exc
        value_filter = _filter(assays, primary_only)
        log.info("census %s: reading obs where %s", where, value_filter)
        obs = (
            exp.obs.read(value_filter=value_filter, column_names=list(OBS_COLUMNS))
            .concat()
            .to_pandas()
        )
        obs["donor"] = obs["dataset_id"].astype(str) + "_" + obs["donor_id"].astype(str)
        table = select_cell_types(
            obs,
            root=root,
            exclude=exclude,
            min_cells=min_cells,
            donors_above=donors_above,
            ancestors_above=ancestors_above,
            cell_types=type_list,
        )
        kept = table.index[table["keep"]]
        log.info(
            "census: %d cells of %d cell types pass the assay/primary filter; %d types kept:\n%s",
            len(obs),
            len(table),
            len(kept),
            table.to_string(),
        )
        if len(kept) == 0:
            raise InputError(
                "no cell type passes the selection "
                f"(min_cells={min_cells}, donors_above={donors_above}, "
                f"ancestors_above={ancestors_above})",
                file=where,
                field="source",
                fix="lower the thresholds for a small store",
            )
        sel = obs[obs["cell_type_ontology_term_id"].astype(str).isin(kept)]
        if max_cells_per_type:
            rng = np.random.default_rng(seed)
            parts = []
            for _, group in sel.sort_values("soma_joinid").groupby(
                "cell_type_ontology_term_id", observed=True, sort=True
            ):
                if len(group) > int(max_cells_per_type):
                    pick = rng.choice(len(group), size=int(max_cells_per_type), replace=False)
                    group = group.iloc[np.sort(pick)]
                parts.append(group)
            sel = pd.concat(parts)
        sel = sel.sort_values("soma_joinid")
        var = _read_genes(exp, measurement, gene_list)
        var_ids = var["soma_joinid"].to_numpy()
        joinids = sel["soma_joinid"].to_numpy()
        blocks = []
        for start in range(0, len(joinids), int(chunk_cells)):
            chunk = joinids[start : start + int(chunk_cells)]
            with warnings.catch_warnings():
                # get_anndata builds its AnnData on integer indexes; anndata warns about it
                warnings.simplefilter("ignore", ad.ImplicitModificationWarning)
                part = cellxgene_census.get_anndata(
                    census,
                    organism=organism,
                    measurement_name=measurement,
                    X_name="raw",
                    obs_coords=chunk,
                    var_coords=var_ids,
                    column_names={"obs": ["soma_joinid"], "var": ["soma_joinid"]},
                )
            rows = pd.Index(part.obs["soma_joinid"].to_numpy()).get_indexer(chunk)
            cols = pd.Index(part.var["soma_joinid"].to_numpy()).get_indexer(var_ids)
            if (rows < 0).any() or (cols < 0).any():
                raise InputError(
                    "the census returned other cells or genes than requested",
                    file=where,
                    fix="check that the store is not being modified",
                )
            blocks.append(sp.csr_matrix(part.X, dtype=np.float32)[rows][:, cols])
            log.info("census: fetched X of %d / %d cells", start + len(chunk), len(joinids))
    X = sp.vstack(blocks, format="csr")
    out_obs = pd.DataFrame(
        {
            "cell_type": sel["cell_type"].astype(str).to_numpy(),
            "cell_type_ontology_term_id": sel["cell_type_ontology_term_id"].astype(str).to_numpy(),
            "donor_id": sel["donor"].to_numpy(),
            "tissue": sel["tissue_general"].astype(str).to_numpy(),
            "assay": sel["assay"].astype(str).to_numpy(),
            "batch": sel["dataset_id"].astype(str).to_numpy(),
            "dataset_id": sel["dataset_id"].astype(str).to_numpy(),
        },
        index=pd.Index([f"census_{j}" for j in joinids]),
    )
    for column in out_obs:
        out_obs[column] = out_obs[column].astype("category")
    out_var = pd.DataFrame(
        {"feature_id": var["feature_id"].astype(str).to_numpy()},
        index=pd.Index(var["feature_name"].astype(str).to_numpy()),
    )
    adata = ad.AnnData(X=X, obs=out_obs, var=out_var)
    adata.var_names_make_unique()
    adata.uns["source"] = {
        "kind": "census",
        "census_version": "" if uri else census_version,
        "uri": uri or "",
        "assays": assays,
        "primary_only": bool(primary_only),
        "min_cells": int(min_cells),
        "donors_above": int(donors_above),
        "ancestors_above": int(ancestors_above),
        "cell_types": [str(t) for t in kept],
        "n_genes_requested": -1 if gene_list is None else len(gene_list),
        "max_cells_per_type": -1 if not max_cells_per_type else int(max_cells_per_type),
        "seed": int(seed),
    }
    return adata
