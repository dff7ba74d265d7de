"""Verified downloads with resume, retries and a checksum lock file (stdlib ``urllib`` only).

:func:`download` streams a URL into ``<dest>.part`` and renames it to ``dest`` only after the
checks pass:

* resume: an existing ``.part`` is continued with an HTTP ``Range`` request (a server that
  ignores the range answers 200 and the download restarts from byte 0);
* retries with exponential backoff (``backoff * 2**attempt`` seconds, capped) on connection
  errors, time-outs, truncated bodies, HTTP 5xx and 429; other HTTP errors (404, 403, ...)
  fail at once;
* refusal of an HTML page where data is expected (``Content-Type: text/html`` or a body that
  starts with ``<!DOCTYPE`` / ``<html``), of a truncated body (fewer bytes than
  ``Content-Length`` or than the expected size) and of a size, sha256 or md5 mismatch; every
  refusal is an :class:`~celltype_bench.errors.InputError` naming the URL, the expected and
  the actual value;
* concurrency: one downloader per destination at a time (``fcntl`` lock on ``<dest>.lock``),
  so parallel workflow jobs sharing one archive download it once;
* progress lines in the log (bytes, percentage, rate) every few seconds.

A *lock file* (YAML, ``files: {url: {sha256: ..., size: ..., md5: ...}}``) pins what each URL
must deliver; ``sha256: null`` means "record on the first verified download", after which
:func:`record_checksum` writes the observed value into the lock atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError

log = logging.getLogger("celltype_bench")

CHUNK_BYTES = 1 << 20
USER_AGENT = "celltype-bench/0.1 (+https://github.com/; urllib)"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0
HTML_PREFIXES = (b"<!doctype", b"<html")
LOCK_HEADER = (
    "# celltype-bench download lock: what every source URL must deliver.\n"
    "# sha256: null = record on the first verified download (the downloader then writes the\n"
    "# observed value here); size and md5 (when given, e.g. Zenodo's published checksum) are\n"
    "# checked on every download. Edit by hand only to pin or reset a value.\n"
)


class _Retryable(Exception):
    """A transient failure: the download is retried (and resumed) after a pause."""


@dataclass(frozen=True)
class Downloaded:
    """A verified file: where it is, its size and checksums, and whether bytes moved."""

    path: Path
    size: int
    sha256: str
    md5: str
    transferred: bool


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def file_digests(path: str | os.PathLike) -> tuple[int, str, str]:
    """(size, sha256, md5) of a file, read in chunks."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return size, sha.hexdigest(), md5.hexdigest()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check(
    url: str,
    path: Path,
    *,
    size: int | None,
    sha256: str | None,
    md5: str | None,
) -> tuple[int, str, str]:
    """Compare a complete file with the expected size and checksums; raise on a mismatch."""
    actual_size, actual_sha, actual_md5 = file_digests(path)
    if size is not None and actual_size != int(size):
        what = "truncated" if actual_size < int(size) else "larger than expected"
        raise InputError(
            f"download of {url} is {what}: expected {int(size)} bytes, got {actual_size}",
            file=str(path),
            field="size",
            fix="rerun to resume/retry; if it persists the source changed: check the URL and "
            "the lock file entry",
        )
    for name, expected, actual in (("sha256", sha256, actual_sha), ("md5", md5, actual_md5)):
        if expected and expected.lower() != actual:
            raise InputError(
                f"checksum mismatch for {url}: expected {name} {expected.lower()}, got {actual}",
                file=str(path),
                field=name,
                fix="the download is corrupt or the source changed; rerun to download again, "
                "and if it persists check the source before updating the lock file",
            )
    return actual_size, actual_sha, actual_md5


def _looks_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(HTML_PREFIXES)


def _content_range_total(header: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", header or "")
    return int(m.group(1)) if m else None


def _content_range_start(header: str | None) -> int | None:
    m = re.match(r"bytes\s+(\d+)-\d+/", header or "")
    return int(m.group(1)) if m else None


class _Progress:
    """Log a progress line at most every ``interval`` seconds."""

    def __init__(self, url: str, total: int | None, done: int, interval: float = 5.0) -> None:
        self.url, self.total, self.done, self.interval = url, total, done, interval
        self.t0 = self.last = time.monotonic()
        self.start = done

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = (self.done - self.start) / max(now - self.t0, 1e-9)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        total = f" / {_fmt_bytes(self.total)}" if self.total else ""
        log.info(
            "download %s: %s%s%s, %s/s",
            self.url,
            _fmt_bytes(self.done),
            total,
            pct,
            _fmt_bytes(rate),
        )


def _attempt(
    url: str,
    part: Path,
    *,
    expect_html: bool,
    timeout: float,
    headers: dict[str, str],
) -> None:
    """One HTTP request: append to ``part`` from its current size; raise _Retryable if transient."""
    offset = part.stat().st_size if part.exists() else 0
    req_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
    if offset:
        req_headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=req_headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https/file)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            total = _content_range_total(exc.headers.get("Content-Range"))
            exc.close()
            if total is not None and total == offset:
                return  # the .part file is already complete
            log.warning("server refused to resume %s at byte %d; restarting", url, offset)
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 at offset {offset}") from exc
        exc.close()
        if exc.code in RETRY_STATUS:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
        raise InputError(
            f"download of {url} failed: HTTP {exc.code} {exc.reason} (expected 200)",
            field="url",
            fix="check the URL in the dataset registry (config/paper.yaml); the record may "
            "have moved",
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    with response:
        status = getattr(response, "status", 200) or 200
        ctype = (response.headers.get("Content-Type") or "").lower()
        if not expect_html and ctype.startswith(("text/html", "application/xhtml")):
            raise InputError(
                f"download of {url} returned an HTML page (Content-Type {ctype!r}) where data "
                "was expected",
                field="url",
                fix="the link probably points at a landing or error page: use the direct file "
                "link (e.g. Zenodo's /files/<name>?download=1)",
            )
        length = response.headers.get("Content-Length")
        expected_len = int(length) if length and length.isdigit() else None
        mode = "ab"
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start is not None and start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, not {offset}")
            total = _content_range_total(response.headers.get("Content-Range"))
            log.info("resuming %s at %s", url, _fmt_bytes(offset))
        else:
            if offset:
                log.warning("server ignored the Range request for %s; restarting", url)
            mode, offset = "wb", 0
            total = expected_len
        progress = _Progress(url, total, offset)
        received = 0
        first = offset == 0
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK_BYTES)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                    if isinstance(exc, http.client.IncompleteRead) and exc.partial:
                        out.write(exc.partial)
                    raise _Retryable(f"connection lost after {received} bytes: {exc!r}") from exc
                except OSError as exc:
                    raise _Retryable(f"read error after {received} bytes: {exc}") from exc
                if not block:
                    break
                if first:
                    first = False
                    if not expect_html and _looks_html(block[:512]):
                        out.close()
                        part.unlink(missing_ok=True)
                        raise InputError(
                            f"download of {url} returned an HTML page (body starts with "
                            f"{block[:40]!r}) where data was expected",
                            field="url",
                            fix="the link probably points at a landing or error page: use the "
                            "direct file link",
                        )
                out.write(block)
                received += len(block)
                progress.update(len(block))
        progress.update(0, force=True)
        if expected_len is not None and received < expected_len:
            raise _Retryable(
                f"body truncated: Content-Length {expected_len}, received {received} bytes"
            )


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    expect_html: bool = False,
    headers: dict[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Downloaded:
    """Download ``url`` to ``dest`` (resumable, retried, verified, atomic); see the module doc.

    An existing ``dest`` is verified instead of downloaded again; one that fails verification
    is deleted and downloaded afresh. ``retries`` counts the attempts after the first.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            try:
                n, sha, md = _check(url, dest, size=size, sha256=sha256, md5=md5)
                log.info("using verified %s (%s, sha256 %s)", dest, _fmt_bytes(n), sha)
                return Downloaded(dest, n, sha, md, transferred=False)
            except InputError as exc:
                log.warning("cached %s fails verification (%s); downloading again", dest, exc)
                dest.unlink()
        log.info("downloading %s -> %s", url, dest)
        last: Exception | None = None
        for attempt in range(int(retries) + 1):
            if attempt:
                pause = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S)
                log.warning(
                    "download of %s failed (%s); retry %d/%d in %.1f s",
                    url,
                    last,
                    attempt,
                    retries,
                    pause,
                )
                sleep(pause)
            try:
                _attempt(url, part, expect_html=expect_html, timeout=timeout, headers=headers or {})
            except _Retryable as exc:
                last = exc
                continue
            break
        else:
            have = part.stat().st_size if part.exists() else 0
            want = f"{int(size)} bytes" if size else "a complete file"
            raise InputError(
                f"download of {url} failed after {int(retries) + 1} attempts: {last} "
                f"(expected {want}, have {have} "
                "bytes in the .part file)",
                file=str(part),
                field="url",
                fix="check the network and rerun: the download resumes from the .part file",
            )
        try:
            n, sha, md = _check(url, part, size=size, sha256=sha256, md5=md5)
        except InputError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        log.info("downloaded %s: %s, sha256 %s", url, _fmt_bytes(n), sha)
        return Downloaded(dest, n, sha, md, transferred=True)


# ---- lock file ----------------------------------------------------------------------------
def read_lock(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``files`` mapping of a lock file (url -> {sha256, size, md5}); {} if absent."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(
            f"cannot parse the download lock file: {exc}",
            file=str(path),
            fix="restore it from version control",
        ) from exc
    files = data.get("files") or {}
    if not isinstance(files, dict):
        raise InputError(
            "'files' must map URLs to {sha256, size, md5}",
            file=str(path),
            field="files",
            fix="restore it from version control",
        )
    return {str(k): dict(v or {}) for k, v in files.items()}


def _leading_comments(path: Path) -> str:
    """The comment block at the top of an existing lock file (kept on rewrite), else ours."""
    if path.exists():
        lines = []
        for line in path.read_text().splitlines(keepends=True):
            if not line.startswith("#"):
                break
            lines.append(line)
        if lines:
            return "".join(lines)
    return LOCK_HEADER


def record_checksum(path: str | os.PathLike, url: str, result: Downloaded) -> bool:
    """Write the observed sha256 (and size) of ``url`` into the lock file if not pinned yet.

    Holds an exclusive lock while reading and rewriting (atomically, via a temporary file).
    Returns True when the file changed. A pinned different value raises InputError.
    """
    path = Path(path)
    with _exclusive(path.with_name(path.name + ".flock")):
        files = read_lock(path)
        entry = files.setdefault(url, {})
        pinned = entry.get("sha256")
        if pinned and pinned.lower() != result.sha256:
            raise InputError(
                f"checksum mismatch for {url}: lock pins sha256 {pinned}, got {result.sha256}",
                file=str(path),
                field=f"files.{url}.sha256",
                fix="the source changed or the download is corrupt; do not update the pin "
                "without checking the source",
            )
        changed = False
        if not pinned:
            entry["sha256"] = result.sha256
            changed = True
        if entry.get("size") is None:
            entry["size"] = result.size
            changed = True
        if not changed:
            return False
        body = yaml.safe_dump({"files": files}, sort_keys=True, width=1000)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(_leading_comments(path) + body)
        os.replace(tmp, path)
        log.info("recorded sha256 %s of %s in %s", result.sha256, url, path)
        return True


def fetch_locked(
    url: str,
    dest: str | os.PathLike,
    lock: str | os.PathLike | None,
    **kwargs: Any,
) -> Downloaded:
    """:func:`download` with the expectations of ``url`` from the lock file, then record it."""
    entry = read_lock(lock).get(url, {}) if lock else {}
    result = download(
        url,
        dest,
        sha256=entry.get("sha256"),
        md5=entry.get("md5"),
        size=entry.get("size"),
        **kwargs,
    )
    if lock:
        record_checksum(lock, url, result)
    return result
