"""The typed train -> serve contract: metadata.json written and read as PackageMetadata."""

import json
import shutil
from pathlib import Path

import pytest

from models.package import (
    SCHEMA_VERSION,
    EnsembleMember,
    PackageError,
    PackageMetadata,
    read_metadata,
)

OLD = Path(__file__).parent / "data"  # metadata.json files written before PackageMetadata (no schema_version)


def test_metadata_round_trips_through_its_file(tmp_path):
    written = PackageMetadata.for_training({"model": {"family": "cnn"}}, 64, best_epoch=2, validation={"auc": 0.9},
                                           ensemble=[EnsembleMember("t1", "cnn", 64, 0.99, "/x")])
    written.write(tmp_path)
    read = read_metadata(tmp_path)
    assert read == written and read.schema_version == SCHEMA_VERSION
    assert read.image_size == 64 and read.ensemble[0].trial_id == "t1" and read.threshold == 0.5


@pytest.mark.parametrize("name", ["package-metadata-before-schema.json", "checkpoint-metadata-before-schema.json"])
def test_packages_written_before_the_schema_still_read(tmp_path, name):
    shutil.copy(OLD / name, tmp_path / "metadata.json")
    old = json.loads((OLD / name).read_text())
    read = read_metadata(tmp_path)
    assert "schema_version" not in old and read.schema_version == SCHEMA_VERSION
    assert read.class_names == ["NORMAL", "PNEUMONIA"] and read.image_size == old["input"]["image_size"] == 32
    assert read.threshold == old["threshold"] and read.config == old["config"]
    assert read.version == old.get("version", "") and read.history == old.get("history", [])


def test_missing_and_unknown_fields_are_refused_by_name(tmp_path):
    old = json.loads((OLD / "package-metadata-before-schema.json").read_text())
    (tmp_path / "metadata.json").write_text(json.dumps({k: v for k, v in old.items()
                                                        if k not in ("threshold", "input")}))
    with pytest.raises(PackageError, match="lacks required field.*input, threshold"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({**old, "treshold": 0.3}))
    with pytest.raises(PackageError, match="unknown key treshold"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({**old, "input": {**old["input"], "image_size": "big"}}))
    with pytest.raises(PackageError, match="input.image_size: expected an integer"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({**old, "schema_version": 99}))
    with pytest.raises(PackageError, match="schema_version 99"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        read_metadata(tmp_path)
