"""Where a replica finds its package: the copy Ray unpacked for the job on this node, storage, or the folder."""

from __future__ import annotations

from pathlib import Path

from models.package import PackageMetadata, save_model_dir
from models.package_store import publish
from serving.package_source import local_path, runtime_env


class _Model:
    def save(self, path):
        Path(path).write_bytes(b"weights")


def test_a_replica_reads_the_shipped_copy_then_storage_then_the_folder_itself(tmp_path, monkeypatch):
    version = "cnn-abc-20261207000000"
    driver = save_model_dir(_Model(), PackageMetadata.for_training({}, 32, version=version), tmp_path / "driver" / version)
    assert runtime_env(str(driver)) == {"py_modules": [str(driver.resolve())]}
    # on another node the driver's folder is absent; Ray unpacked the job's py_modules under runtime_resources
    unpacked = tmp_path / "session" / "runtime_resources" / "py_modules_files" / "_ray_pkg_1234"
    (unpacked / version).mkdir(parents=True)
    (unpacked / version / "metadata.json").write_text("{}")
    absent = f"/nowhere/artifacts/{version}"
    assert local_path(absent) == absent  # nothing shipped yet: the folder as given (the load then names it)
    monkeypatch.syspath_prepend(str(unpacked))
    assert local_path(absent) == str(unpacked / version)
    uri = publish(driver, f"file://{tmp_path}/store")
    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path / "cache"))
    assert local_path(uri) == str(tmp_path / "cache" / "packages" / version)
