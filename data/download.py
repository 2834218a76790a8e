"""Getting the data onto a machine with internet: MedMNIST's npz from Zenodo, or a local Kaggle/Mendeley zip.

Every write is atomic: the file or folder appears under its final name only once complete and
verified, so an interrupted or corrupted download never leaves something that looks like data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from data.dataset import detect_layout
from runtime.errors import PneumoniaError
from runtime.paths import default_cache_dir

# MedMNIST v2 (MedMNIST+ sizes), Zenodo record 10519652; MD5 sums as published by the medmnist package.
MEDMNIST_FILES = {
    64: ("https://zenodo.org/records/10519652/files/pneumoniamnist_64.npz?download=1", "8f4eceb4ccffa70c672198ea285246c6"),
    128: ("https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1", "05b46931834c231683c68f40c47b2971"),
    224: ("https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1", "d6a3c71de1b945ea11211b03746c1fe1"),
}


class DownloadError(PneumoniaError):
    """A download that failed or did not match its checksum; nothing was left behind."""


def fetch(url: str, destination: Path, md5: str, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``destination`` through a temporary file; keep it only if its MD5 matches."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    digest = hashlib.md5()
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5.lower():
            raise DownloadError(
                f"checksum mismatch for {url}: got MD5 {digest.hexdigest()}, expected {md5}; "
                "the download is corrupt or the file changed upstream, and was discarded"
            )
        os.replace(temporary, destination)
    except DownloadError:
        raise
    except Exception as exc:
        raise DownloadError(f"could not download {url}: {exc}") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return destination


def download_medmnist(cache_dir: str | Path | None = None, size: int = 224, url: str | None = None,
                      md5: str | None = None) -> Path:
    """``pneumoniamnist_{size}.npz`` in the cache dir (downloaded once, checksum verified)."""
    if size not in MEDMNIST_FILES and not (url and md5):
        raise DownloadError(f"MedMNIST offers pneumoniamnist at sizes {sorted(MEDMNIST_FILES)}, not {size}")
    default_url, default_md5 = MEDMNIST_FILES.get(size, ("", ""))
    destination = Path(cache_dir or default_cache_dir()) / f"pneumoniamnist_{size}.npz"
    if destination.is_file():
        return destination
    return fetch(url or default_url, destination, md5 or default_md5)


def unpack_zip(archive: str | Path, destination: str | Path) -> Path:
    """Unpack a Kaggle or Mendeley zip so that ``destination/{train,test}/{NORMAL,PNEUMONIA}`` exists."""
    archive, destination = Path(archive), Path(destination)
    if destination.exists():
        raise DownloadError(f"{destination} already exists; remove it or choose another destination")
    if not zipfile.is_zipfile(archive):
        raise DownloadError(f"{archive} is not a zip file")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)  # zipfile drops absolute paths and ".." components
        shutil.rmtree(staging / "__MACOSX", ignore_errors=True)
        _, root = detect_layout(staging)
        os.replace(root, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
