"""Dataset reading: the three layouts, the patient-grouped validation split, unreadable files, subgroups."""

import json

import numpy as np
import pytest

from cli.main import main
from data.dataset import DataLayoutError, Split, block_split, load_splits, patient_id, series_number, subgroup
from tests.conftest import write_split


def test_patient_ids_follow_kermany_file_names():
    assert patient_id("person1234_bacteria_5678.jpeg") == "person1234"
    assert patient_id("/x/person7_virus_12.jpeg") == "person7"
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("IM-0429-0001-0002.jpeg") == "IM-0429"
    assert patient_id("NORMAL2-IM-0927-0001.jpeg") == "NORMAL2-IM-0927"
    assert patient_id("scan.png") == "scan"


def test_subgroups_follow_kermany_file_names():
    assert subgroup("/x/person1234_bacteria_5678.jpeg") == "bacterial pneumonia"
    assert subgroup("person7_virus_12.jpeg") == "viral pneumonia"
    assert subgroup("NORMAL2-IM-0927-0001.jpeg") == "normal, NORMAL2- series"
    assert subgroup("IM-0115-0001.jpeg") == "normal, IM- series"
    assert subgroup("scan.png") == "other"
    names = np.asarray(["IM-0001-0001.jpeg", "scan.png"])
    split = Split("test", np.array([0, 1]), names, paths=names)
    assert split.subgroups().tolist() == ["normal, IM- series", "other"]
    # names that tell nothing, or no names at all (MedMNIST), give no subgroups
    assert Split("test", np.array([0]), names[1:], paths=names[1:]).subgroups() is None
    assert Split("test", np.array([0]), names[:1], images=np.zeros((1, 2, 2), np.uint8)).subgroups() is None


def test_mendeley_layout_is_split_by_patient_and_class(mendeley_dir):
    splits = load_splits(mendeley_dir, val_fraction=0.25, seed=0)
    assert splits.layout == "mendeley"
    assert len(splits.train) + len(splits.val) == 48
    assert len(splits.test) == 16
    assert splits.patient_overlap == 0
    assert set(splits.train.patients).isdisjoint(splits.val.patients)
    # stratified: both classes on both sides, each patient's two images together
    assert all(n > 0 for n in splits.val.counts().values())
    for patient in set(splits.val.patients):
        assert (splits.val.patients == patient).sum() == 2


def test_split_is_seeded(mendeley_dir):
    a = load_splits(mendeley_dir, seed=1)
    b = load_splits(mendeley_dir, seed=1)
    c = load_splits(mendeley_dir, seed=2)
    assert list(a.val.paths) == list(b.val.paths)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_kaggle_layout_nested_as_in_the_zip_merges_val_into_the_pool(tmp_path):
    root = tmp_path / "download" / "chest_xray"
    write_split(root / "train", patients=10, seed=1)
    write_split(root / "val", patients=2, seed=4, offset=300)
    write_split(root / "test", patients=3, seed=2, offset=500)
    (tmp_path / "download" / "__MACOSX").mkdir()
    splits = load_splits(tmp_path / "download", val_fraction=0.2)
    assert splits.layout == "kaggle"
    assert len(splits.train) + len(splits.val) == 40 + 8
    pool = set(splits.train.patients) | set(splits.val.patients)
    assert {"person300", "IM-0301"} <= pool
    assert splits.patient_overlap == 0


def test_medmnist_npz_keeps_its_own_splits(npz_file):
    splits = load_splits(npz_file)
    assert splits.layout == "medmnist"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 12)
    assert splits.train.images.shape == (40, 28, 28)
    assert splits.train.labels.tolist()[:4] == [0, 1, 0, 1]
    # a folder holding the npz works too
    assert load_splits(npz_file.parent).layout == "medmnist"


def test_npz_without_the_medmnist_keys_is_a_clear_error(tmp_path):
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataLayoutError, match="train_images"):
        load_splits(path)


def test_corrupt_and_non_image_files_are_reported_and_skipped(mendeley_dir):
    good = min((mendeley_dir / "train" / "NORMAL").iterdir())
    truncated = mendeley_dir / "train" / "NORMAL" / "IM-0900-0001.jpeg"
    truncated.write_bytes(good.read_bytes()[:200])
    text = mendeley_dir / "train" / "PNEUMONIA" / "notes.txt"
    text.write_text("not an image")
    (mendeley_dir / "train" / "PNEUMONIA" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    splits = load_splits(mendeley_dir)
    assert sorted(splits.unreadable) == sorted([str(truncated), str(text)])
    kept = set(splits.train.paths) | set(splits.val.paths)
    assert str(truncated) not in kept and len(kept) == 48


@pytest.mark.parametrize("make", ["empty", "no_classes", "no_test", "no_images"])
def test_unrecognised_layouts_name_the_expected_one(tmp_path, make):
    root = tmp_path / "data"
    root.mkdir()
    if make == "no_classes":
        (root / "train" / "cats").mkdir(parents=True)
        (root / "test").mkdir()
    elif make == "no_test":
        write_split(root / "train", patients=2)
    elif make == "no_images":
        for split in ("train", "test"):
            for cls in ("NORMAL", "PNEUMONIA"):
                (root / split / cls).mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"train/\{NORMAL,PNEUMONIA\}"):
        load_splits(root)


def test_missing_data_path_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("PNEUMONIA_DATA", raising=False)
    with pytest.raises(DataLayoutError, match="PNEUMONIA_DATA"):
        load_splits(None)
    with pytest.raises(DataLayoutError, match="does not exist"):
        load_splits(tmp_path / "nowhere")


def test_data_check_cli_reports_json(mendeley_dir, capsys):
    (mendeley_dir / "test" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8garbage")
    assert main(["data", "check", "--data", str(mendeley_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["patient_overlap"] == 0
    assert summary["train_plus_val"] == 48
    assert summary["splits"]["test"] == {"NORMAL": 8, "PNEUMONIA": 8, "total": 16, "patients": 8}
    assert summary["unreadable"] == [str(mendeley_dir / "test" / "NORMAL" / "broken.jpeg")]


def test_data_check_cli_on_a_bad_layout_exits_2(tmp_path, capsys):
    assert main(["data", "check", "--data", str(tmp_path)]) == 2
    assert "expected" in capsys.readouterr().err


@pytest.mark.real_data
def test_real_data_counts_and_zero_patient_overlap(real_data, capsys):
    assert main(["data", "check", "--data", str(real_data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    splits = summary["splits"]
    assert summary["train_plus_val"] == 5216
    assert splits["train"]["NORMAL"] + splits["val"]["NORMAL"] == 1341
    assert splits["train"]["PNEUMONIA"] + splits["val"]["PNEUMONIA"] == 3875
    assert splits["test"] == {"NORMAL": 234, "PNEUMONIA": 390, "total": 624, "patients": 427}
    assert splits["train"]["patients"] + splits["val"]["patients"] == 2846
    assert summary["patient_overlap"] == 0
    assert summary["unreadable"] == []
    # the validation split keeps the class balance of train (stratified)
    val_share = splits["val"]["NORMAL"] / splits["val"]["total"]
    assert abs(val_share - 1341 / 5216) < 0.03


def test_block_validation_holds_out_the_lowest_numbered_patients_of_each_series(tmp_path):
    """As the test split was drawn: per class and series the lowest patient numbers, whole patients."""
    root = tmp_path / "data"
    write_split(root / "train", patients=28, per_patient=2, seed=1, offset=100)
    write_split(root / "test", patients=4, seed=2)
    splits = load_splits(root, val_fraction=0.25, validation="block")
    assert splits.patient_overlap == 0 and len(splits.train) + len(splits.val) == 112
    assert splits.val.counts() == {"NORMAL": 14, "PNEUMONIA": 14}  # a quarter of each class: 7 of 28 patients
    for label in (0, 1):
        val = {series_number(p)[1] for p in splits.val.paths[splits.val.labels == label]}
        train = {series_number(p)[1] for p in splits.train.paths[splits.train.labels == label]}
        assert val == set(range(100, 107)) and min(train) == 107
    grouped = load_splits(root, val_fraction=0.25, validation="grouped")
    assert grouped.fingerprint != splits.fingerprint  # the split is part of what a model was trained on
    with pytest.raises(DataLayoutError, match="validation must be one of grouped, block"):
        load_splits(root, validation="random")


def test_block_validation_needs_file_names(npz_file):
    with pytest.raises(DataLayoutError, match="needs Kermany file names"):
        block_split(load_splits(npz_file).train, 0.15)


def test_series_numbers_follow_kermany_file_names():
    assert series_number("/x/person78_bacteria_380.jpeg") == ("bacterial pneumonia", 78)
    assert series_number("person1685_virus_2903.jpeg") == ("viral pneumonia", 1685)
    assert series_number("NORMAL2-IM-0381-0001.jpeg") == ("normal, NORMAL2- series", 381)
    assert series_number("IM-0111-0001.jpeg") == ("normal, IM- series", 111)
    assert series_number("scan.png") == ("other", None)


@pytest.mark.real_data
def test_block_validation_on_the_real_data_sits_next_to_the_test_block(real_data, capsys):
    """Sized like the grouped split; every series' validation patients are numbered below its training ones
    and just above the test split's normal series (IM- 1-111, NORMAL2- 7-381)."""
    assert main(["data", "check", "--data", str(real_data), "--validation", "block", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["splits"]["val"]["total"] - 746) < 40 and summary["patient_overlap"] == 0
    ranges = {(row["split"], row["series"]): row for row in summary["series"]}
    for series in ("normal, IM- series", "normal, NORMAL2- series", "bacterial pneumonia", "viral pneumonia"):
        assert ranges[("val", series)]["last"] < ranges[("train", series)]["first"]
    for series in ("normal, IM- series", "normal, NORMAL2- series"):
        assert ranges[("test", series)]["last"] < ranges[("val", series)]["first"]
    assert main(["data", "check", "--data", str(real_data), "--validation", "block"]) == 0
    printed = capsys.readouterr().out
    assert "val    normal, IM- series" in printed and "patient numbers" in printed


def test_the_unreadable_file_check_is_remembered_until_a_file_changes(mendeley_dir, tmp_path, monkeypatch):
    import data.dataset

    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path / "cache"))
    assert load_splits(mendeley_dir).unreadable == ()
    decoded = []
    monkeypatch.setattr(data.dataset, "find_unreadable", lambda paths: decoded.append(paths) or [])
    assert load_splits(mendeley_dir).unreadable == ()
    assert decoded == []  # the same files: not decoded again
    victim = next((mendeley_dir / "train" / "NORMAL").iterdir())
    victim.write_bytes(b"not a jpeg any more")
    monkeypatch.undo()
    monkeypatch.setenv("PNEUMONIA_CACHE", str(tmp_path / "cache"))
    assert load_splits(mendeley_dir).unreadable == (str(victim),)
