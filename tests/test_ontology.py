"""Tests of the pinned Cell Ontology: conversion, cache, graph queries, label mapping."""

from __future__ import annotations

import pronto
import pytest

from celltype_bench import ontology as ont
from celltype_bench.errors import InputError

T_CELL = "CL:0000084"
CD4_T = "CL:0000624"  # CD4-positive, alpha-beta T cell
B_CELL = "CL:0000236"
LYMPHOCYTE = "CL:0000542"


@pytest.fixture(scope="module")
def onto(tmp_path_factory):
    """The ontology, cached in a temporary directory instead of $HOME."""
    cache = tmp_path_factory.mktemp("cl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ont.CACHE_ENV, str(cache))
        ont.load_ontology.cache_clear()
        yield ont.load_ontology()


def test_loaded_with_pronto_from_cache(onto, tmp_path_factory):
    assert isinstance(onto.pronto, pronto.Ontology)
    assert onto.version == ont.CL_VERSION == "v2026-03-26"
    assert onto.path is not None and onto.path.suffix == ".obo"
    assert onto.path.read_text().startswith("format-version: 1.2\n")
    assert onto.n_terms > 3000
    assert onto.pronto[T_CELL].name == "T cell"


def test_ancestors_and_descendants(onto):
    assert T_CELL in onto.ancestors(CD4_T)
    assert LYMPHOCYTE in onto.ancestors(CD4_T)
    assert "CL:0000000" in onto.ancestors(CD4_T)
    assert CD4_T not in onto.ancestors(T_CELL)
    assert CD4_T not in onto.ancestors(CD4_T)
    assert CD4_T in onto.ancestors(CD4_T, include_self=True)
    assert CD4_T in onto.descendants(T_CELL)
    assert T_CELL not in onto.descendants(CD4_T)
    assert B_CELL not in onto.descendants(T_CELL)
    assert T_CELL in onto.descendants(T_CELL, include_self=True)
    assert onto.ancestors("CL:0000000") == frozenset()


def test_graph_agrees_with_pronto_and_source(onto):
    sup = {t.id for t in onto.pronto[CD4_T].superclasses(with_self=False)}
    assert onto.ancestors(CD4_T) == sup
    sub = {t.id for t in onto.pronto[T_CELL].subclasses(with_self=False)}
    assert onto.descendants(T_CELL) == sub
    source = ont._read_source()
    for tid in (CD4_T, T_CELL, B_CELL, "CL:0017508"):  # last one links via non-CL terms
        assert onto.ancestors(tid) == set(source[tid]["ancestors"]), tid


def test_is_same_or_descendant(onto):
    assert onto.is_same_or_descendant(CD4_T, T_CELL)
    assert onto.is_same_or_descendant(T_CELL, T_CELL)
    assert not onto.is_same_or_descendant(T_CELL, CD4_T)
    assert not onto.is_same_or_descendant(B_CELL, T_CELL)


def test_label_term_id_contains(onto):
    assert onto.label(CD4_T) == "CD4-positive, alpha-beta T cell"
    assert onto.term_id("T lymphocyte") == T_CELL  # synonym
    assert onto.term_id("t CELL") == T_CELL  # label, any case
    assert onto.term_id("cd4-positive, alpha-beta t cell") == CD4_T
    assert onto.term_id(" cl:0000084 ") == T_CELL
    assert T_CELL in onto
    assert "CL:9999999" not in onto
    with pytest.raises(KeyError, match="closest CL labels"):
        onto.term_id("T celll")
    with pytest.raises(KeyError):
        onto.label("CL:9999999")


def test_obo_written_once_and_reused(tmp_path, monkeypatch):
    path = ont.ensure_obo(tmp_path)
    assert path.parent == tmp_path and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert not list(tmp_path.glob("*.tmp"))

    def boom():
        raise AssertionError("source re-read although the OBO cache exists")

    monkeypatch.setattr(ont, "_read_source", boom)
    assert ont.ensure_obo(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    ont.load_ontology.cache_clear()
    try:
        again = ont.load_ontology(tmp_path)
        assert again.path == path and T_CELL in again
        assert ont.load_ontology(tmp_path) is again  # per-process cache
    finally:
        ont.load_ontology.cache_clear()


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(ont.CACHE_ENV, str(tmp_path))
    assert ont.obo_path().parent == tmp_path
    monkeypatch.delenv(ont.CACHE_ENV)
    assert ont.default_cache_dir().name == "celltype-bench"


def test_map_labels_direct_and_via_mapping(onto):
    got = ont.map_labels(
        ["T cell", "CD4 T", "T cell", "Mono", "t lymphocyte"],
        mapping={"CD4 T": CD4_T, "Mono": "classical monocyte"},
        ontology=onto,
    )
    assert got == {
        "T cell": T_CELL,
        "CD4 T": CD4_T,
        "Mono": "CL:0000860",
        "t lymphocyte": T_CELL,
    }


def test_map_labels_unknown_lists_all_with_suggestions(onto):
    with pytest.raises(InputError) as info:
        ont.map_labels(
            ["T cell", "B cells", "Megakaryocytes", "xyzzy qwerty"],
            ontology=onto,
            source="data/raw/pbmc.h5ad",
        )
    err = info.value
    msg = str(err)
    for label in ("B cells", "Megakaryocytes", "xyzzy qwerty"):
        assert f"'{label}'" in msg
    assert "'T cell' (" not in msg  # the mappable label is not reported
    assert "'B cell' (CL:0000236)" in msg
    assert "'megakaryocyte' (CL:0000556)" in msg
    assert err.file == "data/raw/pbmc.h5ad" and "data/raw/pbmc.h5ad" in msg
    assert err.field == "cell_type"
    assert "label_map" in msg and "config.yaml" in msg


def test_map_labels_bad_mapping_value(onto):
    with pytest.raises(InputError, match="monocyt") as info:
        ont.map_labels(["Mono"], mapping={"Mono": "monocyt"}, ontology=onto, source="x.h5ad")
    assert info.value.field == "label_map"
    assert "'monocyte' (CL:0000576)" in str(info.value)


def test_map_labels_refuses_obsolete_with_replacement(onto):
    assert onto.is_obsolete("CL:0000003")
    with pytest.raises(InputError, match=r"obsolete.*CL:0000000 'cell'"):
        ont.map_labels(["native"], mapping={"native": "CL:0000003"}, ontology=onto)
    with pytest.raises(InputError, match=r"CL:0000003.*obsolete.*CL:0000000"):
        ont.map_labels(["CL:0000003"], ontology=onto)


def test_obo_escaping_roundtrip(tmp_path):
    src = {
        "CL:1": {
            "label": "a ! b {c}",
            "ancestors": {},
            "synonyms": ['say "hi"'],
            "deprecated": False,
        },
        "CL:2": {"label": "child", "ancestors": {"CL:1": 1}, "deprecated": False},
    }
    path = tmp_path / "x.obo"
    path.write_text(ont.source_to_obo(src))
    loaded = pronto.Ontology(str(path))
    assert loaded["CL:1"].name == "a ! b {c}"
    assert {s.description for s in loaded["CL:1"].synonyms} == {'say "hi"'}
    assert {t.id for t in loaded["CL:2"].superclasses(with_self=False)} == {"CL:1"}
