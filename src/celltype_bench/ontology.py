"""The pinned Cell Ontology (CL), installed offline and loaded with pronto.

cellxgene-ontology-guide 1.11.1 ships CL ``v2026-03-26`` as a zstd-compressed JSON dict
(term id -> label, synonyms, deprecation and the full ancestor closure with distances).
On first use it is converted into an OBO file under the cache directory
(``$CELLTYPE_BENCH_CACHE`` or ``~/.cache/celltype-bench``) and every later load parses that
file with :class:`pronto.Ontology`.

The parent edges in the source mix ``is_a`` with ``part_of``; both are written as ``is_a`` so
"ancestor" here means "is a or is part of a kind of", which is what CELLxGENE's own
ancestor lists use. A few terms (cell parts such as "banded nucleus") reach ``cell`` only
through non-CL terms; they get their nearest CL ancestor as parent so the OBO closure equals
the source's ancestor lists exactly.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pronto

from .errors import InputError

CL_VERSION = "v2026-03-26"
SOURCE_PACKAGE = "cellxgene_ontology_guide"
SOURCE_FILE = f"CL-ontology-{CL_VERSION}.json.zst"
# Bump when the OBO writer changes, so stale caches are not reused.
OBO_FORMAT_TAG = "1"
CACHE_ENV = "CELLTYPE_BENCH_CACHE"
MAX_LISTED = 25
"""At most this many unmapped labels are spelt out (with suggestions) in one error."""


def default_cache_dir() -> Path:
    """``$CELLTYPE_BENCH_CACHE`` if set, else ``~/.cache/celltype-bench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "celltype-bench"


def obo_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted OBO file of the pinned CL version lives."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"cl-{CL_VERSION}.f{OBO_FORMAT_TAG}.obo"


def _read_source() -> dict[str, dict[str, Any]]:
    """Read the bundled zstd JSON of CL from cellxgene-ontology-guide."""
    import zstandard

    try:
        res = importlib.resources.files(SOURCE_PACKAGE).joinpath("data", SOURCE_FILE)
        with res.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
            return json.loads(reader.read())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise InputError(
            f"Cell Ontology {CL_VERSION} data not found ({exc})",
            file=f"{SOURCE_PACKAGE}/data/{SOURCE_FILE}",
            fix="install cellxgene-ontology-guide==1.11.1 (see pyproject.toml)",
        ) from exc


def _quote(text: str) -> str:
    """Escape a string for a quoted OBO value."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unquoted(text: str) -> str:
    """Escape a string for an unquoted OBO value (name)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("!", "\\!").replace("{", "\\{")


def _direct_parents(ancestors: Mapping[str, int]) -> list[str]:
    """Distance-1 ancestors; failing those, the nearest ones (terms linked via non-CL terms)."""
    if not ancestors:
        return []
    nearest = min(ancestors.values())
    return sorted(a for a, d in ancestors.items() if d == nearest)


def source_to_obo(source: Mapping[str, Mapping[str, Any]]) -> str:
    """Render the cellxgene-ontology-guide JSON dict as OBO 1.2 text."""
    lines = [
        "format-version: 1.2",
        f"data-version: {CL_VERSION}",
        "ontology: cl",
        f"remark: converted by celltype-bench from {SOURCE_PACKAGE} {SOURCE_FILE}",
        "",
    ]
    for tid in sorted(source):
        term = source[tid]
        lines += ["[Term]", f"id: {tid}"]
        label = (term.get("label") or "").strip()
        if label:
            lines.append(f"name: {_unquoted(label)}")
        for syn in term.get("synonyms") or []:
            if syn and syn.strip():
                lines.append(f'synonym: "{_quote(syn.strip())}" EXACT []')
        for parent in _direct_parents(term.get("ancestors") or {}):
            lines.append(f"is_a: {parent}")
        if term.get("deprecated"):
            lines.append("is_obsolete: true")
            if term.get("replaced_by"):
                lines.append(f"replaced_by: {term['replaced_by']}")
            for other in term.get("consider") or []:
                lines.append(f"consider: {other}")
        lines.append("")
    return "\n".join(lines)


def ensure_obo(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the OBO file once (atomically) and return its path; reuse it when present."""
    path = obo_path(cache_dir)
    if path.is_file() and path.stat().st_size > 0:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = source_to_obo(_read_source())
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InputError(
            f"cannot write the Cell Ontology cache: {exc}",
            file=str(path),
            fix=f"set {CACHE_ENV} to a writable directory",
        ) from exc
    return path


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _term_refs(term: pronto.Term, attr: str) -> list[str]:
    """Ids in ``replaced_by``/``consider``, which may point outside CL (pronto then fails)."""
    try:
        return sorted(t.id for t in getattr(term, attr))
    except KeyError:
        return sorted(getattr(term._data(), attr))


class CellOntology:
    """Cell Ontology graph queries backed by a pronto ontology."""

    def __init__(self, onto: pronto.Ontology, path: Path | None = None) -> None:
        self.pronto = onto
        self.path = path
        self.version: str = onto.metadata.data_version or CL_VERSION
        terms = list(onto.terms())
        self._labels: dict[str, str] = {t.id: t.name or "" for t in terms}
        self._obsolete: set[str] = {t.id for t in terms if t.obsolete}
        ancestors: dict[str, frozenset[str]] = {}
        children: dict[str, set[str]] = {t.id: set() for t in terms}
        for t in terms:
            anc = frozenset(s.id for s in t.superclasses(with_self=False))
            ancestors[t.id] = anc
            for a in anc:
                children[a].add(t.id)
        self._ancestors = ancestors
        self._descendants = {k: frozenset(v) for k, v in children.items()}
        # lookup: CL labels first, then synonyms; active terms win over obsolete ones
        self._lookup: dict[str, str] = {}
        ordered = sorted(terms, key=lambda t: (t.obsolete, t.id))
        for t in ordered:
            if t.name:
                self._lookup.setdefault(_norm(t.name), t.id)
        for t in ordered:
            for syn in sorted(s.description for s in t.synonyms):
                self._lookup.setdefault(_norm(syn), t.id)
        # suggestions come from active terms only
        self._choices: dict[str, str] = {}
        for key, tid in self._lookup.items():
            if tid not in self._obsolete:
                self._choices[key] = tid

    def __contains__(self, term_id: object) -> bool:
        """True for a CL id (active or obsolete) of this ontology."""
        return isinstance(term_id, str) and term_id.strip().upper() in self._labels

    def __repr__(self) -> str:
        return f"CellOntology(version={self.version!r}, n_terms={self.n_terms})"

    @property
    def n_terms(self) -> int:
        """Number of terms in the file, obsolete ones included."""
        return len(self._labels)

    def _check(self, term_id: str) -> str:
        tid = term_id.strip().upper()
        if tid not in self._labels:
            raise KeyError(f"{term_id!r} is not a term of Cell Ontology {self.version}")
        return tid

    def ancestors(self, term_id: str, include_self: bool = False) -> frozenset[str]:
        """All ancestors (is_a and part_of, transitively) of a CL id."""
        tid = self._check(term_id)
        anc = self._ancestors[tid]
        return anc | {tid} if include_self else anc

    def descendants(self, term_id: str, include_self: bool = False) -> frozenset[str]:
        """All descendants (transitively) of a CL id."""
        tid = self._check(term_id)
        desc = self._descendants[tid]
        return desc | {tid} if include_self else desc

    def label(self, term_id: str) -> str:
        """The CL label of an id (empty for some obsolete terms)."""
        return self._labels[self._check(term_id)]

    def is_obsolete(self, term_id: str) -> bool:
        """Whether a CL id is deprecated."""
        return self._check(term_id) in self._obsolete

    def replaced_by(self, term_id: str) -> list[str]:
        """Replacement ids of an obsolete term, else its 'consider' ids (may be non-CL)."""
        term = self.pronto[self._check(term_id)]
        return _term_refs(term, "replaced_by") or _term_refs(term, "consider")

    def find(self, label_or_id: str) -> str | None:
        """Like :meth:`term_id` but returns None when nothing matches."""
        text = str(label_or_id).strip()
        if text.upper() in self._labels:
            return text.upper()
        return self._lookup.get(_norm(text))

    def term_id(self, label_or_id: str) -> str:
        """Resolve a CL id, exact CL label or synonym (case-insensitive) to a CL id."""
        tid = self.find(label_or_id)
        if tid is None:
            close = self.suggest(label_or_id)
            hint = f"; closest CL labels: {', '.join(close)}" if close else ""
            raise KeyError(f"{label_or_id!r} is no id, label or synonym in CL {self.version}{hint}")
        return tid

    def suggest(self, text: str, n: int = 3) -> list[str]:
        """Up to n closest active CL labels/synonyms, rendered as "'label' (CL:id)"."""
        hits = difflib.get_close_matches(_norm(text), list(self._choices), n=4 * n, cutoff=0.6)
        out: list[str] = []
        seen: set[str] = set()
        for hit in hits:
            tid = self._choices[hit]
            if tid not in seen:
                seen.add(tid)
                out.append(f"'{self._labels[tid]}' ({tid})")
            if len(out) == n:
                break
        return out

    def is_same_or_descendant(self, pred_id: str, true_id: str) -> bool:
        """True when pred_id equals true_id or is one of its descendants."""
        pred, true = self._check(pred_id), self._check(true_id)
        return pred == true or true in self._ancestors[pred]


@functools.lru_cache(maxsize=4)
def load_ontology(cache_dir: str | os.PathLike | None = None) -> CellOntology:
    """Load the pinned CL (converted to OBO on first use), cached per process."""
    path = ensure_obo(cache_dir)
    try:
        onto = pronto.Ontology(str(path))
    except SyntaxError:
        # a foreign or damaged cache file: rebuild it once
        path.unlink(missing_ok=True)
        path = ensure_obo(cache_dir)
        onto = pronto.Ontology(str(path))
    return CellOntology(onto, path)


def _describe(onto: CellOntology, tid: str) -> str:
    return f"{tid} '{onto.label(tid)}'" if tid in onto else tid


def _obsolete_note(onto: CellOntology, tid: str) -> str:
    repl = onto.replaced_by(tid)
    use = f"use {' or '.join(_describe(onto, r) for r in repl)}" if repl else "pick a current term"
    return f"{tid} '{onto.label(tid)}' is obsolete in CL {onto.version}; {use}"


def map_labels(
    labels: Iterable[Any],
    mapping: Mapping[str, str] | None = None,
    ontology: CellOntology | None = None,
    source: str | None = None,
) -> dict[str, str]:
    """Map each distinct author label to a CL id.

    An entry of ``mapping`` (the dataset's ``label_map``; value a CL id or label) wins;
    otherwise the label itself must be a CL id, label or synonym. All failures are reported
    together in one :class:`InputError` naming ``source`` and the ``cell_type`` field.
    """
    onto = ontology if ontology is not None else load_ontology()
    mapping = dict(mapping or {})

    bad_values = []
    resolved_map: dict[str, str] = {}
    for key, value in mapping.items():
        tid = onto.find(str(value))
        if tid is None:
            close = onto.suggest(str(value))
            hint = f" (closest CL labels: {', '.join(close)})" if close else ""
            bad_values.append(f"'{key}' -> '{value}' is no CL id, label or synonym{hint}")
        elif onto.is_obsolete(tid):
            bad_values.append(f"'{key}' -> '{value}': {_obsolete_note(onto, tid)}")
        else:
            resolved_map[str(key)] = tid
    if bad_values:
        n = len(bad_values)
        what = "label_map entry does" if n == 1 else f"{n} label_map entries do"
        used_for = f" (used for the labels of {source})" if source else ""
        raise InputError(
            f"{what} not name a current Cell Ontology {onto.version} term{used_for}: "
            + "; ".join(bad_values),
            file="config.yaml",
            field="label_map",
            fix="correct these values in the dataset's label_map in config.yaml "
            "(use a CL id such as CL:0000084 or its exact label)",
        )

    out: dict[str, str] = {}
    problems: list[str] = []
    for raw in labels:
        label = str(raw)
        if label in out:
            continue
        if label in resolved_map:
            out[label] = resolved_map[label]
            continue
        tid = onto.find(label)
        if tid is None:
            close = onto.suggest(label)
            hint = f"closest CL labels: {', '.join(close)}" if close else "no close CL label"
            problems.append(f"'{label}' ({hint})")
            out[label] = ""
        elif onto.is_obsolete(tid):
            problems.append(f"'{label}' ({_obsolete_note(onto, tid)})")
            out[label] = ""
        else:
            out[label] = tid
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        if len(problems) > MAX_LISTED:
            shown += f"; ... and {len(problems) - MAX_LISTED} more"
        raise InputError(
            f"{len(problems)} author label(s) could not be mapped to Cell Ontology "
            f"{onto.version}: " + shown,
            file=source,
            field="cell_type",
            fix="add them to the dataset's label_map in config.yaml, mapping each author "
            "label to a CL id or exact CL label (e.g. 'CD4 T cells': 'CL:0000624')",
        )
    return out
