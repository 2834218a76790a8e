"""A package published to storage and fetched into a node's cache: immutable versions, one copy per node and
version, and a clear error naming the package when it is missing or altered. Storage here is a local folder
through pyarrow's file:// file system, the same code path as s3:// (which tests/cluster/test_no_shared_disk.py
runs against a real S3 server)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from models.package import CHECKSUM_FILE, PackageError, PackageMetadata, save_model_dir
from models.package_store import fetch, package_uri, publish, version_of


class _Model:
    def __init__(self, payload: bytes):
        self.payload = payload

    def save(self, path):
        Path(path).write_bytes(self.payload)


def _package(root: Path, version: str, payload: bytes = b"weights") -> Path:
    metadata = PackageMetadata.for_training({"model": {"family": "cnn"}}, 32, version=version)
    return save_model_dir(_Model(payload), metadata, root / version)


def test_a_published_version_is_fetched_once_per_node_verified_and_never_overwritten(tmp_path):
    package = _package(tmp_path / "artifacts", "cnn-abc-20261207000000")
    storage = f"file://{tmp_path}/store"
    uri = publish(package, storage)
    assert uri == package_uri(storage, package.name) == f"file://{tmp_path}/store/packages/{package.name}"
    assert version_of(uri) == package.name
    assert publish(package, storage) == uri  # the same package again: nothing to do
    other = _package(tmp_path / "other", package.name, b"other weights")
    with pytest.raises(PackageError, match="never overwritten"):
        publish(other, storage)

    cache = tmp_path / "cache"
    copies = []
    threads = [threading.Thread(target=lambda: copies.append(fetch(uri, cache))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert copies == [cache / package.name] * 4 and (cache / package.name / "model.keras").read_bytes() == b"weights"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [package.name]  # one copy


def test_a_missing_or_altered_package_is_refused_naming_it(tmp_path):
    storage = f"file://{tmp_path}/store"
    missing = package_uri(storage, "cnn-missing-20990101000000")
    with pytest.raises(PackageError, match=re.escape(f"model package {missing}: not found")):
        fetch(missing, tmp_path / "cache")
    uri = publish(_package(tmp_path / "artifacts", "cnn-abc-20261207000000"), storage)
    (tmp_path / "store" / "packages" / "cnn-abc-20261207000000" / "model.keras").write_bytes(b"tampered")
    with pytest.raises(PackageError, match=re.escape(f"model package {uri}: checksum mismatch")):
        fetch(uri, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # nothing half-copied kept


def test_a_package_without_its_checksum_file_counts_as_not_published(tmp_path):
    storage = f"file://{tmp_path}/store"
    uri = publish(_package(tmp_path / "artifacts", "cnn-abc-20261207000000"), storage)
    (tmp_path / "store" / "packages" / "cnn-abc-20261207000000" / CHECKSUM_FILE).unlink()  # a publish cut short
    with pytest.raises(PackageError, match="not found"):
        fetch(uri, tmp_path / "cache")
