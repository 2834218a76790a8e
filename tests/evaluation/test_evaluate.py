"""Evaluation: metrics against scikit-learn, thresholds from validation only, the report and the package."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from cli.main import main
from evaluation.metrics import (
    binary_report,
    bootstrap_intervals,
    sensitivity_threshold,
    subgroup_rates,
    youden_plateau,
    youden_threshold,
)
from models.package import PackageError, load_model_dir
from tests.conftest import write_split

TINY = ["model.image_size=32", "model.depth=2", "model.base_filters=4", "model.dense_units=8",
        "batch_size=8", "mixed_precision=float32", "epochs=2"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory):
    """One tiny model and its data for the whole module: the evaluations read both and write only under their
    own tmp_path (reports, artifacts), so training it once per test bought nothing."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "chest_xray"
    write_split(data / "train", patients=12, seed=1)
    write_split(data / "test", patients=4, seed=2, offset=500)
    assert main(["train", "--data", str(data), "--output", str(root / "model"), *_sets(TINY)]) == 0
    return root / "model", data


@pytest.fixture
def mendeley_dir(_trained_once):
    return _trained_once[1]


@pytest.fixture
def trained(_trained_once):
    return _trained_once[0]


def _evaluate(model, data, tmp_path, *extra):
    args = ["evaluate", "--model", str(model), "--data", str(data), "--reports", str(tmp_path / "reports"),
            "--artifacts", str(tmp_path / "artifacts"), *extra]
    assert main(args) == 0
    report_dir = tmp_path / "reports" / "cnn"
    return json.loads((report_dir / "report.json").read_text()), report_dir


def _read_predictions(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_metrics_equal_scikit_learn_on_a_known_set():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.65, 0.3, 0.75, 0.55, 0.95])
    report = binary_report(labels, probs, 0.5)
    predicted = probs >= 0.5
    assert report["confusion_matrix"] == [[3, 1], [1, 5]]  # [[tn, fp], [fn, tp]]
    assert report["accuracy"] == pytest.approx(0.8)
    assert report["sensitivity"] == pytest.approx(5 / 6) and report["specificity"] == pytest.approx(3 / 4)
    assert report["precision"] == pytest.approx(5 / 6) and report["npv"] == pytest.approx(3 / 4)
    assert report["auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert report["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert report["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert report["brier"] == pytest.approx(skm.brier_score_loss(labels, probs))


def test_thresholds_youden_and_target_sensitivity():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.65, 0.3, 0.75, 0.55, 0.95])
    # J at 0.55: sens 5/6, spec 3/4 -> 0.583 (the best of the ROC points)
    assert youden_threshold(labels, probs) == pytest.approx(0.55)
    t = sensitivity_threshold(labels, probs, 1.0)
    assert t == pytest.approx(0.3) and (probs[labels == 1] >= t).all()
    assert sensitivity_threshold(labels, probs, 0.8) == pytest.approx(0.55)


def test_the_plateau_rule_takes_the_centre_of_the_near_best_thresholds():
    labels = np.array([0] * 6 + [1] * 6)
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 0.6, 0.65, 0.8, 0.9, 0.95, 0.97])
    # a narrow peak: J = 5/6 at 0.6 only; 4/6 at its neighbours 0.65 and 0.5
    threshold, low, high = youden_plateau(labels, probs, tolerance=0.01)
    assert (low, high) == (0.6, 0.6) and threshold == pytest.approx(0.6)
    # a flat top: every threshold from 0.35 to 0.65 separates the classes perfectly
    separable = np.array([0.1, 0.2, 0.25, 0.3, 0.33, 0.35, 0.65, 0.7, 0.8, 0.9, 0.95, 0.99])
    threshold, low, high = youden_plateau(labels, separable, tolerance=0.01)
    assert (low, high) == (0.65, 0.65)  # one ROC point: the lowest positive score
    threshold, low, high = youden_plateau(labels, separable, tolerance=0.2)  # J = 5/6 either side counts too
    assert low == pytest.approx(0.35) and high == pytest.approx(0.7) and threshold == pytest.approx(0.525)
    assert youden_threshold(labels, separable) == pytest.approx(0.65)


def test_subgroup_rates_count_correct_calls_per_group():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.2, 0.7, 0.1, 0.9, 0.4, 0.8, 0.6])
    groups = ["a", "a", "b", "c", "c", "c", "b"]
    rows = {row["group"]: row for row in subgroup_rates(labels, probs, groups, 0.5)}
    assert [(rows[g]["correct"], rows[g]["images"]) for g in "abc"] == [(1, 2), (2, 2), (2, 3)]
    assert rows["c"]["median_probability"] == pytest.approx(0.8)
    low, high = rows["c"]["ci"]
    assert low < 2 / 3 < high and 0 <= low and high <= 1
    with pytest.raises(ValueError, match="7 labels but 2 subgroups"):
        subgroup_rates(labels, probs, ["a", "b"], 0.5)


def test_bootstrap_intervals_bracket_the_point_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.35 + rng.random(300) * 0.65, 0, 1)
    intervals = bootstrap_intervals(labels, probs, 0.5, resamples=300)
    point = binary_report(labels, probs, 0.5)
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high and high - low < 0.3


def test_evaluate_writes_report_plots_predictions_and_package(trained, mendeley_dir, tmp_path, capsys):
    report, report_dir = _evaluate(trained, mendeley_dir, tmp_path)
    printed = capsys.readouterr().out
    assert "package: " in printed and "threshold" in printed
    test = report["test"]
    assert sum(map(sum, test["confusion_matrix"])) == 16
    assert report["threshold_method"].startswith("centre of the thresholds within 0.01 of the best Youden's J")
    low, high = report["threshold_plateau"]
    assert low <= test["threshold"] <= high and test["threshold"] == pytest.approx((low + high) / 2)
    assert report["calibration"]["method"] == "platt"
    for name in ("validation_j", "reliability"):
        assert (report_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("accuracy", "balanced_accuracy", "auc", "pr_auc", "sensitivity", "specificity", "precision",
                "npv", "f1", "brier"):
        assert key in test and key in report["test_at_0_5"]
    assert report["test_at_0_5"]["threshold"] == 0.5
    assert set(report["confidence_intervals"]) == {"accuracy", "auc", "sensitivity", "specificity"}
    assert report["counts"]["test"] == {"NORMAL": 8, "PNEUMONIA": 8}
    assert len(report["model"]["sha256"]) == 64 and report["data"]["fingerprint"]
    rows = _read_predictions(report_dir / "predictions.csv")
    assert len(rows) == 16 and set(rows[0]) == {"path", "label", "prob_pneumonia", "pred"}
    assert all(r["pred"] == ("PNEUMONIA" if float(r["prob_pneumonia"]) >= test["threshold"] else "NORMAL")
               for r in rows)
    for name in ("confusion_matrix", "roc", "pr", "calibration"):
        path = report_dir / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
            assert image.size[0] >= 400 and image.size[1] >= 400
    # the generated names encode subgroups: every test image is counted once, its calls as in predictions.csv
    test_groups = {row["group"]: row for row in report["subgroups"]["test"]}
    assert set(report["subgroups"]) == {"val", "test"}
    assert set(test_groups) == {"bacterial pneumonia", "normal, IM- series"}
    normal = test_groups["normal, IM- series"]
    assert normal["images"] == 8 and normal["correct"] == sum(r["pred"] == r["label"] == "NORMAL" for r in rows)
    assert test_groups["bacterial pneumonia"]["correct"] == test["confusion_matrix"][1][1]
    card = (report_dir / "report.md").read_text()
    assert "## Where the errors fall" in card and "| normal, IM- series | " in card
    assert "Produced by: model directory" in card
    assert "Kermany et al. 2018" in card and "92.8 %" in card and "not a diagnostic device" in card.lower()
    assert "grouped by patient" in card

    (package,) = (tmp_path / "artifacts").iterdir()
    metadata = json.loads((package / "metadata.json").read_text())
    assert metadata["threshold"] == test["threshold"] and metadata["version"] == package.name
    assert metadata["input"]["image_size"] == 32 and metadata["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert metadata["test_metrics"]["auc"] == test["auc"]
    assert {"tensorflow", "keras"} <= set(metadata["versions"])
    assert (package / "model.keras").read_bytes() == (trained / "model.keras").read_bytes()


def test_every_evaluation_measures_how_far_answers_move_when_films_are_re_encoded(trained, mendeley_dir, tmp_path):
    from evaluation.stability import PERTURBATIONS

    report, report_dir = _evaluate(trained, mendeley_dir, tmp_path)
    stability = report["stability"]
    assert set(stability["splits"]) == {"val", "test"} and stability["splits"]["test"]["films"] == 16
    for measured in stability["splits"].values():
        assert set(measured["perturbations"]) == set(PERTURBATIONS)
        for row in measured["perturbations"].values():
            assert 0 <= row["mean"] <= row["p99"] <= row["max"] <= 1 and 0 <= row["flips"] <= measured["films"]
    assert "## Stable answers" in (report_dir / "report.md").read_text()
    # the command the report names gives the same figures for an exported package
    (package,) = (tmp_path / "artifacts").iterdir()
    out = tmp_path / "stability.json"
    assert main(["stability", "--package", str(package), "--data", str(mendeley_dir), "--split", "test",
                 "--json", str(out)]) == 0
    again = json.loads(out.read_text())["splits"]["test"]
    for name, row in stability["splits"]["test"]["perturbations"].items():
        assert again["perturbations"][name]["flips"] == row["flips"]
        assert again["perturbations"][name]["max"] == pytest.approx(row["max"], abs=1e-6)
        assert again["perturbations"][name]["firm_flips"] == row["firm_flips"]  # the package carries the band
    assert again["firm"] == stability["splits"]["test"]["firm"]


def test_a_quick_run_measures_stability_on_a_fixed_sample_and_says_so(trained, mendeley_dir, tmp_path):
    report, report_dir = _evaluate(trained, mendeley_dir, tmp_path, "--stability-films", "8")
    stability = report["stability"]
    assert stability["splits"]["test"]["films"] == stability["splits"]["val"]["films"] == 8
    assert "sample of at most 8 films" in stability["sample"]
    assert "Measured on a fixed stratified sample" in (report_dir / "report.md").read_text()
    assert report["borderline"]["fitted_on"].startswith("val split (8 films")


def test_the_borderline_band_is_fitted_on_validation_and_travels_with_the_package(trained, mendeley_dir, tmp_path):
    report, report_dir = _evaluate(trained, mendeley_dir, tmp_path)
    band, stability = report["borderline"], report["stability"]["splits"]
    assert 0 <= band["low"] <= report["threshold"] <= band["high"] <= 1 and band["fitted_on"].startswith("val split")
    # by its rule the band holds every validation film that flipped: no firm validation answer flips
    assert all(row["firm_flips"] == 0 for row in stability["val"]["perturbations"].values())
    for split in ("val", "test"):
        assert band[split]["firm"] + band[split]["borderline"] == band[split]["films"] == stability[split]["films"]
        assert band[split]["firm"] == stability[split]["firm"]
    (package,) = (tmp_path / "artifacts").iterdir()
    metadata = json.loads((package / "metadata.json").read_text())
    assert [metadata["borderline"]["low"], metadata["borderline"]["high"]] == band["test"]["band"]
    assert "## Borderline answers" in (report_dir / "report.md").read_text()


def test_re_encodings_change_what_they_say_and_nothing_else():
    import io

    from evaluation.stability import perturbed

    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 255, (40, 50), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    versions = {name: np.asarray(Image.open(io.BytesIO(data))) for name, data in perturbed(buffer.getvalue()).items()}
    np.testing.assert_array_equal(versions["png (Pillow's pixels)"], pixels)
    np.testing.assert_array_equal(versions["+1 grey level"], pixels + 1)
    np.testing.assert_array_equal(versions["-1 grey level"], pixels - 1)
    assert versions["resize 2 %"].shape == (41, 51)
    for quality in ("jpeg q95", "jpeg q85"):
        assert versions[quality].shape == pixels.shape and not np.array_equal(versions[quality], pixels)


def test_threshold_never_depends_on_test_labels(trained, mendeley_dir, tmp_path):
    first, _ = _evaluate(trained, mendeley_dir, tmp_path / "a")
    swapped = tmp_path / "swapped"
    shutil.copytree(mendeley_dir, swapped)
    (swapped / "test" / "NORMAL").rename(swapped / "test" / "tmp")
    (swapped / "test" / "PNEUMONIA").rename(swapped / "test" / "NORMAL")
    (swapped / "test" / "tmp").rename(swapped / "test" / "PNEUMONIA")
    second, _ = _evaluate(trained, swapped, tmp_path / "b")
    assert second["threshold"] == first["threshold"]
    assert second["data"]["test_fingerprint"] != first["data"]["test_fingerprint"]
    assert second["test"]["auc"] == pytest.approx(1 - first["test"]["auc"])


def test_target_sensitivity_threshold_holds_on_validation(trained, mendeley_dir, tmp_path):
    report, _ = _evaluate(trained, mendeley_dir, tmp_path, "--target-sensitivity", "0.95")
    assert "sensitivity >= 0.95" in report["threshold_method"]
    assert report["validation_at_threshold"]["sensitivity"] >= 0.95


def test_package_reloads_in_a_fresh_process_and_reproduces_predictions(trained, mendeley_dir, tmp_path):
    _, report_dir = _evaluate(trained, mendeley_dir, tmp_path)
    (package,) = (tmp_path / "artifacts").iterdir()
    script = (
        "import sys, csv\n"
        "from data.dataset import load_splits\n"
        "from models.package import load_model_dir\n"
        "from evaluation.evaluate import predict_split\n"
        "from runtime.paths import display_path\n"
        "from runtime.tensorflow_setup import configure_tensorflow\n"
        "configure_tensorflow(0, 'float32')\n"  # the evaluation's threads: the same kernels, the same floats
        "model, meta = load_model_dir(sys.argv[1])\n"
        "test = load_splits(sys.argv[2]).test\n"
        "for path, p in zip(test.paths, meta.probabilities(predict_split(model, test, meta.input))):\n"
        "    print(display_path(path), repr(float(p)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(package), str(mendeley_dir)],
                            capture_output=True, text=True, timeout=300, check=True)
    fresh = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    rows = _read_predictions(report_dir / "predictions.csv")
    assert {r["path"]: r["prob_pneumonia"] for r in rows} == fresh


def test_tampered_package_is_refused(trained, mendeley_dir, tmp_path):
    _evaluate(trained, mendeley_dir, tmp_path)
    (package,) = (tmp_path / "artifacts").iterdir()
    data = bytearray((package / "model.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package / "model.keras").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="checksum mismatch.*model.keras"):
        load_model_dir(package)


def test_a_package_without_film_checks_gets_them_without_reading_the_test_split(trained, mendeley_dir, tmp_path,
                                                                               capsys, monkeypatch):
    import evaluation.films
    from models.package import read_metadata

    report, _ = _evaluate(trained, mendeley_dir, tmp_path, "--no-film-checks")
    assert report["ood"]["film_checks"] is None
    (package,) = (tmp_path / "artifacts").iterdir()
    read, stored_films = [], evaluation.films.stored_films
    monkeypatch.setattr(evaluation.films, "stored_films", lambda split: read.append(split.name) or stored_films(split))
    assert main(["add-film-checks", "--package", str(package), "--data", str(mendeley_dir),
                 "--artifacts", str(tmp_path / "artifacts")]) == 0
    assert "validation films refused by the checks: 0 of" in capsys.readouterr().out
    assert read == ["train", "val"]  # fitted on training films, counted on validation; no test film decoded
    added = tmp_path / "artifacts" / f"{package.name}-checks"
    old, new = read_metadata(package), read_metadata(added)
    assert new.film_checks is not None and new.film_checks.min_side == 32 // 4
    assert new.replace(film_checks=None, version=old.version, created_at=old.created_at, source=old.source) == old
    for name in ("model.keras", "ood.npz"):
        assert (added / name).read_bytes() == (package / name).read_bytes()
    load_model_dir(added)  # checksums hold
    assert main(["add-film-checks", "--package", str(added), "--data", str(mendeley_dir)]) == 2
    assert "already has film checks" in capsys.readouterr().err


def test_evaluate_from_an_experiment_best_json(trained, mendeley_dir, tmp_path):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "best.json").write_text(json.dumps({"trial_id": "abc_00001", "checkpoint_path": str(trained),
                                                      "metrics": {"val_auc": 0.9}}))
    assert main(["evaluate", "--experiment", str(experiment), "--data", str(mendeley_dir),
                 "--reports", str(tmp_path / "r"), "--artifacts", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "r" / "cnn-abc_00001" / "report.json").read_text())  # <family>-<trial>
    assert report["model"]["produced_by"]["trial_id"] == "abc_00001"


def test_evaluate_refuses_other_data_and_missing_experiments(trained, tmp_path, capsys):
    from tests.conftest import write_split

    other = tmp_path / "other"
    write_split(other / "train", patients=5, seed=9, offset=40)
    write_split(other / "test", patients=2, seed=9, offset=900)
    assert main(["evaluate", "--model", str(trained), "--data", str(other)]) == 2
    assert "not the data this model was trained on" in capsys.readouterr().err
    assert main(["evaluate", "--experiment", str(tmp_path / "nothing")]) == 2
    assert "best.json not found" in capsys.readouterr().err


@pytest.mark.real_data
def test_evaluation_of_a_tiny_real_model_covers_all_624_test_images(real_data, tmp_path):
    model = tmp_path / "real-model"
    assert main(["train", "--data", str(real_data), "--output", str(model),
                 *_sets(["model.image_size=64", "model.depth=3", "model.base_filters=8", "epochs=1",
                         "data.max_train_images=256", "batch_size=32"])]) == 0
    report, report_dir = _evaluate(model, real_data, tmp_path)
    assert report["counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert report["counts"]["val"]["NORMAL"] + report["counts"]["val"]["PNEUMONIA"] + \
        report["counts"]["train"]["NORMAL"] + report["counts"]["train"]["PNEUMONIA"] == 5216
    rows = _read_predictions(report_dir / "predictions.csv")
    assert len(rows) == 624 and len({r["path"] for r in rows}) == 624
    assert sum(map(sum, report["test"]["confusion_matrix"])) == 624
    # the checks before the model (issue 20): what is no film refused, real films kept
    ood = report["ood"]
    assert sum(ood["film_checks"]["validation_refused"].values()) <= 0.02 * sum(report["counts"]["val"].values())
    assert sum(ood["film_checks"]["test_refused"].values()) <= 0.02 * 624
    kinds = {row["kind"]: row for row in ood["kinds"]}
    assert all(kinds[kind]["by_checks"] >= 0.95 for kind in ("blank", "tiny", "strip", "inverted")), kinds
    # stability: one grey level on every pixel moves a real model's answers, and the measurement sees it
    moved = report["stability"]["splits"]["test"]["perturbations"]
    assert report["stability"]["splits"]["test"]["films"] == 624 and moved["+1 grey level"]["mean"] > 0
