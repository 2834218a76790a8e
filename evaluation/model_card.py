"""report.md: the model card a clinician or reviewer reads beside the numbers."""

from __future__ import annotations

import json

from evaluation.metrics import PLATEAU_TOLERANCE
from models.package import METRIC

REFERENCES = [
    # name, accuracy, sensitivity, specificity, AUC (None = not reported)
    ("Kermany et al. 2018 (InceptionV3, ImageNet weights; same 624 test images)", 0.928, 0.932, 0.901, 0.968),
    ("MedMNIST v2 PneumoniaMNIST best (its own test split)", 0.946, None, None, 0.991),
]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _ci(report: dict, name: str, scale: float = 100.0, unit: str = " %") -> str:
    value = report["test"][name]
    low, high = report["confidence_intervals"][name]
    digits = 1 if scale == 100.0 else 3
    return f"{scale * value:.{digits}f}{unit} ({scale * low:.{digits}f}-{scale * high:.{digits}f})"


def ensemble_lines(members: list[dict]) -> list[str]:
    if not members:
        return []
    listed = "; ".join(f"`{m['trial_id']}` ({m['family']}, validation AUC {m['val_auc']:.4f})" for m in members)
    return [f"- An ensemble: the mean probability of the search's {len(members)} best trials at this input size "
            f"(best first): {listed}. The config below is the best member's; each member's own best epoch and "
            "validation metrics are in the search's trials."]


def _rate(row: dict | None, with_ci: bool) -> str:
    if row is None:
        return "-"
    text = f"{row['correct']}/{row['images']} ({100 * row['rate']:.1f} %"
    if with_ci:
        text += f", {100 * row['ci'][0]:.1f}-{100 * row['ci'][1]:.1f}"
    return text + ")"


def subgroup_lines(subgroups: dict) -> list[str]:
    """Correct calls per file-name subgroup, validation beside test: where a shift shows, and where not."""
    if not subgroups:
        return []
    by_split = {split: {row["group"]: row for row in rows} for split, rows in subgroups.items()}
    groups = sorted({group for rows in by_split.values() for group in rows})
    lines = [
        "## Where the errors fall",
        "",
        "Correct calls at the chosen threshold per subgroup the file names encode (test: Wilson 95 % interval); "
        "for a NORMAL subgroup this is its specificity, for a PNEUMONIA one its sensitivity.",
        "",
        "| subgroup | validation | test | median P(pneumonia), validation / test |",
        "|---|---|---|---|",
    ]
    for group in groups:
        val, test = by_split.get("val", {}).get(group), by_split.get("test", {}).get(group)
        median = " / ".join("-" if row is None else f"{row['median_probability']:.3f}" for row in (val, test))
        lines.append(f"| {group} | {_rate(val, False)} | {_rate(test, True)} | {median} |")
    return lines + [""]


def _produced_by(produced_by: dict) -> str:
    """Where the model came from, in words: the experiment and trial, or the model directory."""
    if produced_by.get("kind") != "tuning experiment":
        return f"- Produced by: model directory `{produced_by.get('path')}`."
    validation = produced_by.get("validation") or {}
    auc = ""
    if METRIC in validation:
        auc = f", validation AUC {validation[METRIC]:.4f} at epoch {validation.get('epoch')}"
    return (f"- Produced by: trial `{produced_by.get('trial_id')}` of the tuning experiment "
            f"`{produced_by['experiment']}`{auc}.")


def result_lines(report: dict) -> list[str]:
    """The test result at the chosen threshold beside the references, at 0.5, the confusion matrix, plots."""
    test, at_half = report["test"], report["test_at_0_5"]
    (tn, fp), (fn, tp) = test["confusion_matrix"]
    lines = [
        "## Result on the held-out test split",
        "",
        f"Threshold {test['threshold']:.4f}, chosen on the validation split only ({report['threshold_method']}); "
        f"the test split was scored once. 95 % bootstrap confidence intervals "
        f"({report['bootstrap_resamples']} resamples) in brackets.",
        "",
        "| model | accuracy | sensitivity | specificity | ROC AUC |",
        "|---|---|---|---|---|",
        f"| **this model** | {_ci(report, 'accuracy')} | {_ci(report, 'sensitivity')} | "
        f"{_ci(report, 'specificity')} | {_ci(report, 'auc', 1.0, '')} |",
    ]
    for name, acc, sens, spec, auc in REFERENCES:
        lines.append(f"| {name} | {_pct(acc)} | {_pct(sens)} | {_pct(spec)} | {'-' if auc is None else f'{auc:.3f}'} |")
    lines += ["", "| metric | at the chosen threshold | at 0.5 |", "|---|---|---|"]
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("precision", "precision (PPV)"),
                       ("npv", "NPV"), ("f1", "F1"), ("pr_auc", "PR AUC (average precision)"),
                       ("brier", "Brier score"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                       ("specificity", "specificity")):
        lines.append(f"| {label} | {test[key]:.3f} | {at_half[key]:.3f} |")
    return lines + [
        "",
        f"Confusion matrix at the chosen threshold (NORMAL negative, PNEUMONIA positive): "
        f"TN {tn}, FP {fp}, FN {fn}, TP {tp}.",
        "",
        "![ROC](roc.png) ![confusion matrix](confusion_matrix.png)",
        "![precision-recall](pr.png) ![calibration](calibration.png)",
        "",
        *operating_point_lines(report),
    ]


def operating_point_lines(report: dict) -> list[str]:
    """How the threshold was chosen on validation: calibration, the J curve, the plateau."""
    calibration = report.get("calibration")
    if calibration is None and report.get("threshold_plateau") is None:
        return []
    lines = ["## How the operating point was chosen (validation only)", ""]
    if calibration:
        lines.append(f"- Probabilities calibrated on the {calibration['fitted_on']} by {calibration['method']} "
                     f"scaling (slope {calibration['slope']:.3f}, intercept {calibration['intercept']:.3f}); "
                     f"validation Brier score {calibration['validation_brier_before']:.4f} before, "
                     f"{calibration['validation_brier_after']:.4f} after. The served probability is the calibrated one.")
    if report.get("threshold_plateau"):
        low, high = report["threshold_plateau"]
        lines.append(f"- Youden's J on validation is within {PLATEAU_TOLERANCE} of its best for thresholds "
                     f"{low:.4f}-{high:.4f}; "
                     f"the threshold is the centre of that plateau, {report['threshold']:.4f}.")
    return lines + ["", "![validation J curve](validation_j.png) ![reliability](reliability.png)", ""]


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "none"


def ood_lines(report: dict) -> list[str]:
    """What the endpoint refuses, by the checks before the model and by the gate: of real films, and of what
    is not a chest film."""
    ood = report.get("ood")
    if not ood:
        return []
    lines = ["## What the endpoint refuses", ""]
    checks = ood.get("film_checks")
    if checks:
        low, high = checks["aspect_range"]
        lines += [f"Before the model (HTTP 422, not overridden by `?force=true`): a shorter side under "
                  f"{checks['min_side']} px (`too_small`), width/height outside {low:.3g}-{high:.3g} (`aspect`), a "
                  f"grey-level spread under {checks['min_spread']:.4f} (`blank`), an inverted film (`inverted`); fitted "
                  f"on the {checks['fitted_on']}. They refused {_reasons(checks['validation_refused'])} of the "
                  f"validation films and {_reasons(checks['test_refused'])} of the test films.", ""]
    if ood.get("method"):
        lines += [f"The gate (HTTP 422 with the score) refuses an image whose {ood['method']} score exceeds "
                  f"{ood['threshold']:.4g}, the {100 * ood['quantile']:.1f}th percentile of the validation films' "
                  f"scores; fitted on the {ood['fitted_on']}.", ""]
    lines += [
        f"- In-distribution films refused: validation {100 * ood['validation_refusal_rate']:.1f} %, test "
        f"{100 * ood['test_refusal_rate']:.1f} % ({ood['test_refused']} of the test films: "
        f"{_reasons(ood['test_refused_by'])}).",
        "",
        "| not a chest film like the training ones | images | refused | by the film checks | by the gate | "
        "gate AUROC vs test films | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ood["kinds"]:
        auroc = "-" if row["auroc"] is None else f"{row['auroc']:.3f}"
        lines.append(f"| {row['kind']} | {row['images']} | {100 * row['detection_rate']:.0f} % | "
                     f"{100 * row['by_checks']:.0f} % | {100 * row['by_gate']:.0f} % | {auroc} | {row['verdict']} |")
    missed = [f"{image['name']} ({image['kind']})" for image in ood["images"] if not image["refused"]]
    if missed:
        lines += ["", "Let through: " + ", ".join(missed[:20]) + (f" and {len(missed) - 20} more" if len(missed) > 20 else "")
                  + "."]
    return lines + [""]


def stability_lines(report: dict) -> list[str]:
    """How far P moves when the same film is re-encoded benignly, per split and perturbation."""
    stability = report.get("stability")
    if not stability:
        return []
    lines = ["## Stable answers", "",
             "Every film re-encoded in ways a reader would not see, each version sent through the endpoint's own "
             "path; the change in P(pneumonia) against the film's own bytes, and the labels that flip at the "
             f"threshold. Reproduce: `{stability['command']}`."
             + (f" Measured on {stability['sample']}." if stability.get("sample") else ""), "",
             "| films | re-encoding | mean abs(dP) | p99 abs(dP) | max abs(dP) | label flips | among firm answers |",
             "|---|---|---|---|---|---|---|"]
    for split, measured in stability["splits"].items():
        films = f"{measured['films']}" + (f", {measured['firm']} firm" if "firm" in measured else "")
        for name, row in measured["perturbations"].items():
            lines.append(f"| {split} ({films}) | {name} | {row['mean']:.3g} | {row['p99']:.3g} | "
                         f"{row['max']:.3g} | {row['flips']} | {row.get('firm_flips', '-')} |")
    return lines + [""]


def borderline_lines(report: dict) -> list[str]:
    """What borderline means, how often it happens, and the metrics on the answers that are firm."""
    band = report.get("borderline")
    if not band:
        return []
    val, test = band["val"], band["test"]
    lines = ["## Borderline answers", "",
             f"An answer whose P(pneumonia) lies strictly between {band['low']:.4f} and {band['high']:.4f} is "
             "marked **borderline** (`certainty` in the endpoint's answer): so near the threshold that re-encoding "
             "the film in a way no reader would see (a JPEG save, a 2 % resize) could give it the other label. "
             f"Outside the band it is **firm**. The band was fitted on the validation films' re-encodings "
             f"({band['rule']}; {band['half_width']:.3f} logit on each side of the threshold). "
             f"Validation: {val['firm']} of {val['films']} films firm ({_pct(val['firm_share'])}); test: "
             f"{test['firm']} of {test['films']} ({_pct(test['firm_share'])}), and {test['borderline_wrong']} of the "
             f"{test['borderline']} borderline test answers were wrong.", ""]
    if "metrics" in test:
        lines += ["| test films | accuracy | sensitivity | specificity |", "|---|---|---|---|"]
        for name, metrics in (("all", report["test"]), (f"firm answers ({test['firm']})", test["metrics"])):
            lines.append(f"| {name} | {_pct(metrics['accuracy'])} | {_pct(metrics['sensitivity'])} | "
                         f"{_pct(metrics['specificity'])} |")
        lines.append("")
    return lines


def data_lines(report: dict) -> list[str]:
    counts = report["counts"]
    return [
        "## Data and splits",
        "",
        f"- Source: `{report['data']['source']}` ({report['data']['layout']} layout), fingerprint "
        f"`{report['data']['fingerprint']}`.",
        f"- Validation ({counts['val']['NORMAL']} NORMAL, {counts['val']['PNEUMONIA']} PNEUMONIA) was carved from "
        "train grouped by patient (no child on both sides), stratified by class, seeded. It chose the "
        "training epoch, the model and the threshold.",
        f"- Test: {counts['test']['NORMAL']} NORMAL, {counts['test']['PNEUMONIA']} PNEUMONIA, read only by this "
        "evaluation.",
        "",
    ]


def model_lines(report: dict) -> list[str]:
    """What was evaluated: family and input, ensemble members, where it came from, its training config."""
    model, config = report["model"], report["model"]["config"]
    validation = report["validation_at_threshold"]
    lines = [
        "## Model and training",
        "",
        f"- Family `{config['model']['family']}`, input {config['model']['image_size']} x "
        f"{config['model']['image_size']} grayscale in [0, 1]; model file sha256 `{model['sha256'][:16]}...`.",
        *ensemble_lines(model["produced_by"].get("ensemble", [])),
        _produced_by(model["produced_by"]),
    ]
    if model.get("best_epoch") is not None:
        lines.append(f"- Best epoch {model['best_epoch']}; validation metrics at that epoch: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in model.get("validation", {}).items()))
    return lines + [
        f"- Validation at the chosen threshold: AUC {validation['auc']:.4f}, sensitivity "
        f"{validation['sensitivity']:.4f}, specificity {validation['specificity']:.4f}.",
        "",
        "<details><summary>Training config</summary>",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "</details>",
        "",
    ]


LIMITATIONS = [
    "## Intended use and limitations",
    "",
    "- Intended use: research and teaching on pneumonia detection from frontal pediatric chest X-rays; "
    "triage experiments with a human reader in the loop.",
    "- Not a diagnostic device; not validated prospectively or on any other population.",
    "- Data: pediatric patients aged one to five from a single centre (Guangzhou Women and Children's "
    "Medical Center, Kermany et al. 2018). Adults, other scanners, other hospitals and other views may "
    "behave differently; the test split itself is shifted from train (validation AUC overstates it).",
    "- Labels are NORMAL vs PNEUMONIA (bacterial and viral merged); other findings are not modelled.",
    "- The probability is calibrated only as far as the calibration plot shows.",
]


def render(report: dict) -> str:
    lines = [
        f"# Model card: {report['name']}",
        "",
        "Pneumonia vs normal on pediatric chest radiographs. **Research use only: not a diagnostic device.**",
        "",
        *result_lines(report),
        *subgroup_lines(report.get("subgroups", {})),
        *ood_lines(report),
        *stability_lines(report),
        *borderline_lines(report),
        *data_lines(report),
        *model_lines(report),
        *LIMITATIONS,
    ]
    return "\n".join(lines) + "\n"
