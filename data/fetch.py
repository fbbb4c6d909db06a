"""`turbofed data fetch`: download NASA's C-MAPSS archive, verify it, place it atomically.

The data folder must never hold a half-download or a file that failed its hash: other
commands trust whatever they find there. So everything is staged in a temporary folder
next to the data folder, every known SHA-256 is checked, and only then is each file
moved in with os.replace (atomic on one filesystem). Any failure leaves the data folder
as it was and removes the staging folder.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import http.client
import io
import logging
import os
import shutil
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from turbofed.config import resolve_data_dir
from turbofed.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).resolve().parent / "manifest.toml"
CHUNK = 1 << 16
MAX_ZIP_DEPTH = 3  # NASA nests one zip; more than a few levels is not a dataset archive


@dataclass(frozen=True)
class Manifest:
    """What to download and what the result must contain (from data/manifest.toml)."""

    url: str
    expected: tuple[str, ...]
    optional: tuple[str, ...] = ()
    sha256: dict[str, str] = field(default_factory=dict)  # verified against downloads

    def wanted(self, name: str) -> bool:
        """Whether a basename found in the archive belongs in the data folder."""
        return (
            name in self.expected
            or name in self.sha256
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.optional)
        )


def load_manifest(path: Path | None = None) -> Manifest:
    """Read the manifest; a missing or malformed one is a DataError naming the file."""
    path = MANIFEST_PATH if path is None else path
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        return Manifest(
            url=str(doc["archive"]["url"]),
            expected=tuple(doc["files"]["expected"]),
            optional=tuple(doc["files"].get("optional", ())),
            sha256={k: v.lower() for k, v in doc.get("sha256", {}).items()},
        )
    except FileNotFoundError:
        raise DataError(f"{path}: dataset manifest not found") from None
    except (tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed dataset manifest ({exc!r})") from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (C-MAPSS files are several MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _already_complete(data_dir: Path, manifest: Manifest) -> bool:
    """All expected files present and every known hash matches: no need to download."""
    for name in manifest.expected:
        path = data_dir / name
        if not path.is_file():
            return False
        known = manifest.sha256.get(name)
        if known and sha256_file(path) != known:
            return False
    return True


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into `dest` with a progress bar; network failures become DataError."""
    request = urllib.request.Request(url, headers={"User-Agent": "turbofed-data-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, dest.open("wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc="C-MAPSS", file=sys.stderr, disable=None, leave=False,
            ) as bar:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DataError(f"download failed: HTTP {exc.code} {exc.reason} for {url}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"download failed: cannot reach {url}: {exc.reason}") from None
    except TimeoutError:
        raise DataError(f"download failed: no data for {timeout:g} s from {url} (timed out)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"download failed: {url}: {exc!r}") from None
    if total is not None and received != total:
        raise DataError(f"download failed: {url} sent {received} of {total} bytes (truncated)")
    log.info("downloaded %d bytes from %s", received, url)


def _copy_hashing(src: BinaryIO, dest: Path) -> str:
    """Write a zip member to `dest` and return its SHA-256 in the same pass."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _extract(zf: zipfile.ZipFile, stage: Path, manifest: Manifest, found: dict[str, str], depth: int = 0) -> None:
    """Copy wanted members (by basename) into `stage`, recursing into nested zips."""
    for info in zf.infolist():
        if info.is_dir():
            continue
        name = PurePosixPath(info.filename.replace("\\", "/")).name
        if name.lower().endswith(".zip"):
            if depth >= MAX_ZIP_DEPTH:
                raise DataError(f"{info.filename}: zips nested deeper than {MAX_ZIP_DEPTH} levels")
            with zipfile.ZipFile(io.BytesIO(zf.read(info))) as inner:
                _extract(inner, stage, manifest, found, depth + 1)
        elif manifest.wanted(name):
            tmp = stage / (name + ".part")
            with zf.open(info) as src:
                digest = _copy_hashing(src, tmp)
            if name in found and found[name] != digest:
                raise DataError(f"{name}: the archive holds two different copies")
            os.replace(tmp, stage / name)
            found[name] = digest
        else:
            log.debug("ignoring %s in archive", info.filename)


def fetch_cmapss(
    data_dir: Path, url: str | None = None, timeout: float = 60.0, manifest: Manifest | None = None
) -> list[Path]:
    """Download, verify and place C-MAPSS into `data_dir`; return the files written.

    Files already present with the same content are left alone (not in the result).
    If every expected file is already present and matches its known hash, nothing is
    downloaded. Raises DataError, with the data folder untouched, on any failure.
    """
    manifest = load_manifest() if manifest is None else manifest
    url = url or manifest.url
    if not timeout > 0:
        raise DataError(f"timeout must be a positive number of seconds, got {timeout}")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: exists and is not a folder")
    if _already_complete(data_dir, manifest):
        log.info("%s already holds every C-MAPSS file (known hashes match); nothing to fetch", data_dir)
        return []

    # Stage next to the destination so os.replace never crosses a filesystem.
    parent = data_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".turbofed-fetch-", dir=parent))
    except OSError as exc:
        raise DataError(f"cannot create a staging folder in {parent}: {exc}") from None
    try:
        archive = stage / "archive.download"
        _download(url, archive, timeout)
        files = stage / "files"
        files.mkdir()
        found: dict[str, str] = {}
        try:
            with zipfile.ZipFile(archive) as zf:
                _extract(zf, files, manifest, found)
        except zipfile.BadZipFile as exc:
            size = archive.stat().st_size
            raise DataError(f"{url}: not a valid, intact zip archive ({size} bytes received; {exc})") from None

        bad = [
            f"{name} (expected sha256 {manifest.sha256[name]}, got {digest})"
            for name, digest in sorted(found.items())
            if name in manifest.sha256 and manifest.sha256[name] != digest
        ]
        if bad:
            raise DataError(
                f"SHA-256 mismatch in archive from {url}: {'; '.join(bad)}; nothing written to {data_dir}"
            )
        missing = [name for name in manifest.expected if name not in found]
        if missing:
            raise DataError(
                f"archive from {url} lacks {', '.join(missing)}; nothing written to {data_dir}"
            )

        data_dir.mkdir(parents=True, exist_ok=True)
        placed: list[Path] = []
        for name, digest in sorted(found.items()):
            dest = data_dir / name
            if dest.is_file() and sha256_file(dest) == digest:
                log.info("%s: already present, unchanged", dest)
                continue
            os.replace(files / name, dest)
            placed.append(dest)
            how = "verified" if name in manifest.sha256 else "no known hash"
            log.info("%s: placed (sha256 %s, %s)", dest, digest, how)
        return placed
    except OSError as exc:
        raise DataError(f"cannot stage or place C-MAPSS files near {data_dir}: {exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of `turbofed data fetch`."""
    data_dir = resolve_data_dir(args.data_dir)
    placed = fetch_cmapss(data_dir, url=args.url, timeout=args.timeout)
    if placed:
        print(f"placed {len(placed)} file(s) in {data_dir}: {', '.join(p.name for p in placed)}")
    else:
        print(f"{data_dir} is up to date; nothing placed")
    return 0
