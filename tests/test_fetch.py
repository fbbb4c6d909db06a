"""`turbofed data fetch` against a real HTTP server on 127.0.0.1.

The server serves a zip built here from the shared C-MAPSS files, nested the way NASA
nests it (outer zip holding CMAPSSData.zip). Only some of NASA's files are shared, so
most tests use the real manifest with `expected` cut down to the files we have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import socket
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from turbofed.cli import main
from turbofed.data import fetch
from turbofed.errors import DataError

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TURBOFED_TEST_CMAPSS", REPO.parent / "shared" / "data" / "cmapss"))
SHARED_FILES = (
    "train_FD001.txt", "test_FD001.txt", "RUL_FD001.txt", "train_FD002.txt", "test_FD002.txt", "RUL_FD002.txt",
    "train_FD003.txt", "train_FD004.txt", "readme.txt", "Damage_Propagation_Modeling.pdf",
)
TIMEOUT = 5.0

if not all((SHARED / name).is_file() for name in SHARED_FILES[:9]):
    pytest.skip(
        f"shared C-MAPSS files not found in {SHARED} (set TURBOFED_TEST_CMAPSS)",
        allow_module_level=True,
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shared_files() -> dict[str, bytes]:
    return {n: (SHARED / n).read_bytes() for n in SHARED_FILES if (SHARED / n).is_file()}


def nasa_zip(files: dict[str, bytes]) -> bytes:
    """An outer zip holding CMAPSSData.zip, like NASA's download."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("6. Turbofan Engine Degradation Simulation Data Set/CMAPSSData.zip", inner.getvalue())
        zf.writestr("__MACOSX/._CMAPSSData.txt", b"junk")
    return outer.getvalue()


@pytest.fixture(scope="module")
def good_zip() -> bytes:
    return nasa_zip(shared_files())


@pytest.fixture
def manifest() -> fetch.Manifest:
    """The real manifest (real hashes), expecting only the files the shared folder has."""
    real = fetch.load_manifest()
    have = [n for n in real.expected if (SHARED / n).is_file()]
    return dataclasses.replace(real, expected=tuple(have))


class Server:
    """Routes: path -> (status, body); '/slow' stalls longer than any client timeout."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes]] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"PK")
                    self.wfile.flush()
                    time.sleep(3)
                    return
                if self.path == "/truncated":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"PK" * 100)
                    self.close_connection = True
                    return
                status, body = routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes, status: int = 200) -> str:
        self.routes[path] = (status, body)
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def no_staging_left(parent: Path) -> bool:
    return not any(p.name.startswith(".turbofed-fetch-") for p in parent.iterdir())


def test_manifest_hashes_match_shared_copies() -> None:
    real = fetch.load_manifest()
    assert len(real.expected) == 13 and "readme.txt" in real.expected
    # Every data file NASA ships is verified; only the readme is placed unchecked.
    assert set(real.sha256) == set(real.expected) - {"readme.txt"}
    checked = 0
    for name, digest in real.sha256.items():
        if (SHARED / name).is_file():
            assert fetch.sha256_file(SHARED / name) == digest, name
            checked += 1
    assert checked >= 8  # the shared folder's eight data files (FD001-FD004)


def test_success_places_verified_files(
    tmp_path: Path, server: Server, manifest: fetch.Manifest, good_zip: bytes
) -> None:
    files = shared_files()
    url = server.serve("/cmapss.zip", good_zip)
    data_dir = tmp_path / "cmapss"
    placed = fetch.fetch_cmapss(data_dir, url=url, timeout=TIMEOUT, manifest=manifest)
    assert sorted(p.name for p in placed) == sorted(files)
    for name, data in files.items():
        got = (data_dir / name).read_bytes()
        assert sha(got) == sha(data)
        if name in manifest.sha256:
            assert sha(got) == manifest.sha256[name]
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(files)
    assert no_staging_left(tmp_path)

    # Second run: already complete, no download attempted (the URL now 404s).
    server.routes.clear()
    assert fetch.fetch_cmapss(data_dir, url=url, timeout=TIMEOUT, manifest=manifest) == []


def test_present_matching_files_left_alone(
    tmp_path: Path, server: Server, manifest: fetch.Manifest, good_zip: bytes
) -> None:
    files = shared_files()
    url = server.serve("/cmapss.zip", good_zip)
    data_dir = tmp_path / "cmapss"
    data_dir.mkdir()
    (data_dir / "train_FD001.txt").write_bytes(files["train_FD001.txt"])
    (data_dir / "RUL_FD001.txt").write_bytes(b"stale\n")  # wrong content: replaced
    before = (data_dir / "train_FD001.txt").stat()
    placed = fetch.fetch_cmapss(data_dir, url=url, timeout=TIMEOUT, manifest=manifest)
    assert "train_FD001.txt" not in {p.name for p in placed}
    assert "RUL_FD001.txt" in {p.name for p in placed}
    after = (data_dir / "train_FD001.txt").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (data_dir / "RUL_FD001.txt").read_bytes() == files["RUL_FD001.txt"]


def test_corrupted_file_rejected_and_nothing_written(
    tmp_path: Path, server: Server, manifest: fetch.Manifest
) -> None:
    files = shared_files()
    data = bytearray(files["test_FD001.txt"])
    data[1000] = ord("7") if data[1000] != ord("7") else ord("8")
    files["test_FD001.txt"] = bytes(data)
    url = server.serve("/cmapss.zip", nasa_zip(files))
    data_dir = tmp_path / "cmapss"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("mine")
    (data_dir / "RUL_FD001.txt").write_bytes(b"old copy\n")
    before = snapshot(data_dir)
    with pytest.raises(DataError, match=r"test_FD001\.txt.*expected sha256 3cda7109"):
        fetch.fetch_cmapss(data_dir, url=url, timeout=TIMEOUT, manifest=manifest)
    assert snapshot(data_dir) == before
    assert no_staging_left(tmp_path)


def test_missing_expected_files_with_real_manifest(tmp_path: Path, server: Server, good_zip: bytes) -> None:
    url = server.serve("/cmapss.zip", good_zip)
    data_dir = tmp_path / "cmapss"
    with pytest.raises(DataError, match=r"lacks .*test_FD003\.txt"):
        fetch.fetch_cmapss(data_dir, url=url, timeout=TIMEOUT)
    assert not data_dir.exists()
    assert no_staging_left(tmp_path)


@pytest.mark.parametrize(
    "path, body, status, pattern",
    [
        ("/missing.zip", None, 404, r"HTTP 404 .*missing\.zip"),
        ("/page.html", b"<html>maintenance</html>", 200, r"page\.html: not a valid, intact zip"),
        ("/slow", None, 200, r"timed out"),
        ("/truncated", None, 200, r"download failed: .*truncated"),
    ],
)
def test_bad_downloads_leave_nothing(
    tmp_path: Path, server: Server, manifest: fetch.Manifest,
    path: str, body: bytes | None, status: int, pattern: str,
) -> None:
    if body is not None:
        server.serve(path, body, status)
    data_dir = tmp_path / "cmapss"
    start = time.monotonic()
    with pytest.raises(DataError, match=pattern):
        fetch.fetch_cmapss(data_dir, url=server.base + path, timeout=0.5, manifest=manifest)
    assert time.monotonic() - start < 2.5
    assert not data_dir.exists()
    assert no_staging_left(tmp_path)


def test_connection_refused(tmp_path: Path, manifest: fetch.Manifest) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cmapss.zip"
    with pytest.raises(DataError, match=rf"cannot reach {url}"):
        fetch.fetch_cmapss(tmp_path / "cmapss", url=url, timeout=TIMEOUT, manifest=manifest)
    assert list(tmp_path.iterdir()) == []


def test_cli_fetch(
    tmp_path: Path, server: Server, manifest: fetch.Manifest,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], good_zip: bytes,
) -> None:
    monkeypatch.setattr(fetch, "load_manifest", lambda path=None: manifest)
    url = server.serve("/cmapss.zip", good_zip)
    data_dir = tmp_path / "cmapss"
    assert main(["data", "fetch", "--data-dir", str(data_dir), "--url", url, "--timeout", "5"]) == 0
    assert "placed" in capsys.readouterr().out
    assert (data_dir / "train_FD001.txt").is_file()

    bad = server.base + "/nope.zip"
    assert main(["data", "fetch", "--data-dir", str(tmp_path / "other"), "--url", bad, "--timeout", "5"]) == 2
    assert "HTTP 404" in capsys.readouterr().err
