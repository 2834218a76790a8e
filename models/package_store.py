"""A model package in storage: published once into an immutable version folder next to the experiments
(``STORAGE/packages/VERSION``), and fetched by each node that serves it into a node-local cache keyed by version.

Storage is whatever Tune's own storage reads (s3://, gs://, a path with a ``?endpoint_override=...`` query),
through the same pyarrow file systems, so a cluster that can run a search can also serve its package. The
checksum file every package carries (``models.package``) is written last when publishing and verified after
fetching: a half-written or altered package is never loaded.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from pathlib import Path

from models.package import CHECKSUM_FILE, PackageError, verify_model_dir
from runtime.paths import default_cache_dir

PACKAGES = "packages"  # the folder of published packages, beside the experiments in a storage path


def is_uri(package: str | os.PathLike) -> bool:
    """Whether ``package`` names storage (s3://, gs://, ...) rather than a folder on this machine."""
    return "://" in str(package)


def _split(uri: str) -> tuple[str, str]:
    path, sep, query = uri.partition("?")
    return path.rstrip("/"), sep + query


def package_uri(storage: str, version: str) -> str:
    """Where the package ``version`` is published under the storage path ``storage``."""
    path, query = _split(storage)
    return f"{path}/{PACKAGES}/{version}{query}"


def version_of(uri: str) -> str:
    """The version a package URI names: its last path segment."""
    return _split(uri)[0].rsplit("/", 1)[-1]


def _filesystem(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _read_checksums(uri: str) -> str | None:
    """The published package's checksum file, None when there is none (nothing, or a half-written package)."""
    import pyarrow.fs

    fs, root = _filesystem(uri)
    path = f"{root}/{CHECKSUM_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def publish(package_dir: str | Path, storage: str) -> str:
    """Copy the verified local package into ``STORAGE/packages/VERSION``; returns its URI. A version already
    published with the same checksums is left as it is; with other checksums it is refused (versions are
    immutable)."""
    import pyarrow.fs

    package_dir = Path(package_dir)
    verify_model_dir(package_dir)
    uri = package_uri(storage, package_dir.name)
    local = (package_dir / CHECKSUM_FILE).read_text()
    published = _read_checksums(uri)
    if published is not None:
        if published != local:
            raise PackageError(f"{uri} already holds another package of version {package_dir.name}; published "
                               f"versions are never overwritten")
        return uri
    fs, root = _filesystem(uri)
    fs.create_dir(root, recursive=True)
    local_fs = pyarrow.fs.LocalFileSystem()
    for name in sorted(os.listdir(package_dir), key=lambda n: n == CHECKSUM_FILE):  # the checksums last
        pyarrow.fs.copy_files(str(package_dir / name), f"{root}/{name}", source_filesystem=local_fs,
                              destination_filesystem=fs)
    return uri


def check_published(uri: str) -> None:
    """A clear error, before anything is deployed, when ``uri`` holds no whole package."""
    try:
        found = _read_checksums(uri)
    except (OSError, ValueError) as exc:
        raise PackageError(f"model package {uri}: cannot read it: {exc}") from None
    if found is None:
        raise PackageError(f"model package {uri}: not found ({CHECKSUM_FILE} is missing: nothing was published "
                           f"there, or not all of it)")


def fetch(uri: str, cache: str | Path | None = None) -> Path:
    """The package at ``uri`` in this node's cache (``$PNEUMONIA_CACHE/packages/VERSION``), copied once per node
    and version (concurrent callers wait on a lock and share the copy) and verified against its checksums. A
    missing package or a checksum mismatch is a :class:`PackageError` naming the package."""
    import pyarrow.fs

    cache = Path(cache) if cache else default_cache_dir() / PACKAGES
    cache.mkdir(parents=True, exist_ok=True)
    version = version_of(uri)
    target = cache / version
    with open(cache / f".{version}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if target.is_dir():
            try:
                verify_model_dir(target)
                return target
            except PackageError:  # a cached copy altered since: fetched again
                shutil.rmtree(target)
        check_published(uri)
        partial = cache / f".{version}.{os.getpid()}.{threading.get_ident()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        fs, root = _filesystem(uri)
        try:
            pyarrow.fs.copy_files(root, str(partial), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            verify_model_dir(partial)
        except PackageError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise PackageError(f"model package {uri}: {str(exc).replace(str(partial), 'the copy')}") from None
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise PackageError(f"model package {uri}: cannot copy it: {exc}") from None
        os.replace(partial, target)
    return target
