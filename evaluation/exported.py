"""Commands on an exported package that need no new read of the test split's labels.

``pneumonia add-film-checks``: a package made before the checks before the model existed gets them, fitted
on its training films, without another read of the test split. The model, threshold, calibration, gate and
test metrics are kept byte for byte; the new version (``VERSION-checks``) differs only by ``film_checks`` in
its metadata. Its report is the old one: refusal rates on test films come with the next pre-registered
evaluation.

``pneumonia stability``: how far a package's answers move when its films are re-encoded
(``evaluation.stability``), on the images of a split, no labels read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from evaluation.evaluate import EvaluationError, EvaluationOptions, fit_film_checks, load_evaluation_data
from evaluation.films import split_refusals
from evaluation.stability import stability_report
from models.config import TrainConfig
from models.inference import batch_predictor, recorded_runtime
from models.ood import with_embedding
from models.package import load_model_dir, load_ood_scorer, read_metadata, utc_now, verify_model_dir, write_package
from runtime.config import from_dict
from runtime.tensorflow_setup import configure_tensorflow


def add_film_checks(package_dir: str | Path, data: str | None = None, artifacts_dir: str | Path = "artifacts",
                    log: Callable[[str], None] = print) -> Path:
    """Write ``ARTIFACTS/VERSION-checks``: ``package_dir`` with film checks fitted on the training films of the
    data it was trained on (refused otherwise, by fingerprint), and their refusals on validation logged."""
    package_dir = Path(package_dir)
    verify_model_dir(package_dir)
    metadata = read_metadata(package_dir)
    if metadata.film_checks is not None:
        raise EvaluationError(f"{package_dir} already has film checks (fitted on the {metadata.film_checks.fitted_on})")
    if not metadata.version:
        raise EvaluationError(f"{package_dir} is a training checkpoint, not an evaluated package: run pneumonia "
                              "evaluate, which fits the checks itself")
    splits = load_evaluation_data(from_dict(TrainConfig, metadata.config), data, metadata.data.get("fingerprint"))
    checks = fit_film_checks(splits, metadata.input, EvaluationOptions(), log)
    refused = Counter(r for r in split_refusals(splits.val, metadata.image_size, checks) if r)
    log(f"validation films refused by the checks: {sum(refused.values())} of {len(splits.val)}"
        + (f" ({', '.join(f'{n} {reason}' for reason, n in refused.items())})" if refused else ""))
    version = f"{metadata.version}-checks"
    updated = metadata.replace(version=version, created_at=utc_now(), film_checks=checks,
                               source={**metadata.source, "film_checks_added_to": metadata.version})
    out = write_package(package_dir, updated, Path(artifacts_dir) / version, load_ood_scorer(package_dir, metadata))
    log(f"package: {out}")
    return out


def stability_of_package(package: str | Path, data: str | None = None, split_names: tuple[str, ...] = ("val",),
                         log: Callable[[str], None] = print) -> dict:
    """``pneumonia stability``: the measurement for an exported package, on its data's ``split_names``."""
    configure_tensorflow(0, "float32")
    model, metadata = load_model_dir(package)
    splits = load_evaluation_data(from_dict(TrainConfig, metadata.config), data, metadata.data.get("fingerprint"))
    chosen = [getattr(splits, name) for name in split_names]
    command = f"pneumonia stability --package {package} " + " ".join(f"--split {name}" for name in split_names)
    served = batch_predictor(with_embedding(model), recorded_runtime(metadata.runtime))  # as the endpoint runs it
    return stability_report(served, metadata, chosen, command, log)
