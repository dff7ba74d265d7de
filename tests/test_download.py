"""The verified downloader against a local HTTP server (127.0.0.1 only, in a thread)."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml

from celltype_bench.data.download import download, fetch_locked, read_lock, record_checksum
from celltype_bench.errors import InputError

BODY = bytes(range(256)) * 1200  # 307,200 bytes
SHA = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()
FAST = {"backoff": 0.001, "timeout": 5.0}


class Handler(http.server.BaseHTTPRequestHandler):
    hits: Counter = Counter()
    ranges: list[str | None] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, body: bytes, ctype: str = "application/octet-stream", length=None):
        start = 0
        rng = self.headers.get("Range")
        if rng and self.path.startswith(("/good", "/interrupt", "/flaky")):
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length if length is not None else len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        Handler.hits[path] += 1
        Handler.ranges.append(self.headers.get("Range"))
        n = Handler.hits[path]
        if path in ("/good.bin", "/good2.bin"):
            self._send(BODY)
        elif path == "/corrupt.bin":
            self._send(BODY[:-1] + b"\x00")
        elif path == "/truncated.bin":
            # announces the full size, sends 1,000 bytes fewer, closes the connection
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:-1000])
            self.close_connection = True
        elif path == "/missing.bin":
            self.send_error(404, "Not Found")
        elif path == "/flaky.bin":
            if n <= 2:
                self.send_error(500, "Internal Server Error")
            else:
                self._send(BODY)
        elif path == "/html.bin":
            self._send(b"<!DOCTYPE html><html><body>Error</body></html>", ctype="text/html")
        elif path == "/sniff.bin":
            self._send(b"  <html><body>Sign in</body></html>", ctype="application/zip")
        elif path == "/interrupt.bin":
            if n == 1:
                # first request: half of the body, then the connection drops
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY[: len(BODY) // 2])
                self.close_connection = True
            else:
                self._send(BODY)
        else:
            self.send_error(400)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _reset():
    Handler.hits.clear()
    Handler.ranges.clear()


def test_good_file_verified_and_atomic(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="celltype_bench")
    dest = tmp_path / "cache" / "good.bin"
    got = download(f"{server}/good.bin", dest, sha256=SHA, md5=MD5, size=len(BODY), **FAST)
    assert dest.read_bytes() == BODY
    assert (got.sha256, got.size, got.transferred) == (SHA, len(BODY), True)
    assert not dest.with_name("good.bin.part").exists()
    assert any("downloaded" in r.message and SHA in r.message for r in caplog.records)
    assert any("100%" in r.message for r in caplog.records)  # progress line
    # second call: verified from disk, no request
    again = download(f"{server}/good.bin", dest, sha256=SHA, **FAST)
    assert again.transferred is False
    assert Handler.hits["/good.bin"] == 1


def test_checksum_mismatch_refused(server, tmp_path):
    dest = tmp_path / "corrupt.bin"
    with pytest.raises(InputError) as err:
        download(f"{server}/corrupt.bin", dest, sha256=SHA, **FAST)
    msg = str(err.value)
    assert f"{server}/corrupt.bin" in msg and SHA in msg
    assert hashlib.sha256(BODY[:-1] + b"\x00").hexdigest() in msg
    assert not dest.exists() and not dest.with_name("corrupt.bin.part").exists()


def test_md5_mismatch_refused(server, tmp_path):
    with pytest.raises(InputError, match="expected md5 0+, got " + MD5):
        download(f"{server}/good.bin", tmp_path / "x.bin", md5="0" * 32, **FAST)


def test_truncated_body_refused_after_retries(server, tmp_path):
    dest = tmp_path / "truncated.bin"
    with pytest.raises(InputError) as err:
        download(f"{server}/truncated.bin", dest, retries=2, **FAST)
    msg = str(err.value)
    assert f"{server}/truncated.bin" in msg and "truncated" in msg
    assert str(len(BODY)) in msg and str(len(BODY) - 1000) in msg
    assert Handler.hits["/truncated.bin"] == 3
    assert not dest.exists()


def test_size_mismatch_names_expected_and_actual(server, tmp_path):
    with pytest.raises(InputError) as err:
        download(f"{server}/good.bin", tmp_path / "g.bin", size=len(BODY) + 5, **FAST)
    assert f"expected {len(BODY) + 5} bytes, got {len(BODY)}" in str(err.value)


def test_404_fails_at_once(server, tmp_path):
    with pytest.raises(InputError, match=r"missing\.bin failed: HTTP 404"):
        download(f"{server}/missing.bin", tmp_path / "m.bin", retries=3, **FAST)
    assert Handler.hits["/missing.bin"] == 1


def test_500_then_success_with_backoff(server, tmp_path, caplog):
    pauses: list[float] = []
    dest = tmp_path / "flaky.bin"
    got = download(
        f"{server}/flaky.bin", dest, sha256=SHA, retries=3, backoff=0.5, sleep=pauses.append
    )
    assert got.sha256 == SHA and dest.read_bytes() == BODY
    assert Handler.hits["/flaky.bin"] == 3
    assert pauses == [0.5, 1.0]  # exponential backoff


def test_500_forever_gives_up(server, tmp_path):
    Handler.hits["/flaky.bin"] = -100  # stays in its failing phase
    with pytest.raises(InputError, match="failed after 3 attempts: HTTP 500"):
        download(f"{server}/flaky.bin", tmp_path / "f.bin", retries=2, **FAST)


@pytest.mark.parametrize("path", ["/html.bin", "/sniff.bin"])
def test_html_page_refused(server, tmp_path, path):
    dest = tmp_path / "page.bin"
    with pytest.raises(InputError, match="HTML page") as err:
        download(f"{server}{path}", dest, **FAST)
    assert f"{server}{path}" in str(err.value)
    assert not dest.exists() and not dest.with_name("page.bin.part").exists()


def test_interrupted_then_resumed_with_range(server, tmp_path):
    dest = tmp_path / "interrupt.bin"
    got = download(f"{server}/interrupt.bin", dest, sha256=SHA, size=len(BODY), **FAST)
    assert dest.read_bytes() == BODY and got.sha256 == SHA
    assert Handler.hits["/interrupt.bin"] == 2
    assert Handler.ranges == [None, f"bytes={len(BODY) // 2}-"]


def test_existing_part_file_resumed(server, tmp_path):
    dest = tmp_path / "good.bin"
    dest.with_name("good.bin.part").write_bytes(BODY[:1000])
    download(f"{server}/good.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == BODY
    assert Handler.ranges == ["bytes=1000-"]


def test_complete_part_file_416(server, tmp_path):
    dest = tmp_path / "good.bin"
    dest.with_name("good.bin.part").write_bytes(BODY)
    download(f"{server}/good.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == BODY


def test_corrupt_cache_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "good.bin"
    dest.write_bytes(b"junk")
    got = download(f"{server}/good.bin", dest, sha256=SHA, **FAST)
    assert got.transferred and dest.read_bytes() == BODY


def test_parallel_downloads_share_one_transfer(server, tmp_path):
    dest = tmp_path / "good2.bin"
    results = []

    def run():
        results.append(download(f"{server}/good2.bin", dest, sha256=SHA, **FAST))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Handler.hits["/good2.bin"] == 1
    assert sorted(r.transferred for r in results) == [False, False, True]


def test_lock_file_records_then_enforces(server, tmp_path):
    lock = tmp_path / "paper.lock.yaml"
    url = f"{server}/good.bin"
    lock.write_text(yaml.safe_dump({"files": {url: {"sha256": None}}}))
    fetch_locked(url, tmp_path / "a.bin", lock, **FAST)
    entry = read_lock(lock)[url]
    assert entry == {"sha256": SHA, "size": len(BODY)}
    assert lock.read_text().startswith("# celltype-bench download lock")
    # a second verified download changes nothing
    assert fetch_locked(url, tmp_path / "a.bin", lock, **FAST).transferred is False
    # a pinned different value is refused, naming both values
    lock.write_text(yaml.safe_dump({"files": {url: {"sha256": "ab" * 32}}}))
    with pytest.raises(InputError) as err:
        fetch_locked(url, tmp_path / "b.bin", lock, **FAST)
    assert "ab" * 32 in str(err.value) and SHA in str(err.value)


def test_record_checksum_refuses_conflicting_pin(tmp_path):
    from celltype_bench.data.download import Downloaded

    lock = tmp_path / "l.yaml"
    lock.write_text(yaml.safe_dump({"files": {"u": {"sha256": "cd" * 32, "size": 3}}}))
    with pytest.raises(InputError, match="lock pins sha256"):
        record_checksum(lock, "u", Downloaded(Path("x"), 3, "ef" * 32, "", True))


def test_lock_rewrite_keeps_comment_header(tmp_path):
    from celltype_bench.data.download import Downloaded

    lock = tmp_path / "l.yaml"
    lock.write_text("# my header\n# second line\nfiles:\n  u: {sha256: null}\n")
    assert record_checksum(lock, "u", Downloaded(Path("x"), 3, "ef" * 32, "", True))
    text = lock.read_text()
    assert text.startswith("# my header\n# second line\nfiles:")
    assert read_lock(lock)["u"] == {"sha256": "ef" * 32, "size": 3}
