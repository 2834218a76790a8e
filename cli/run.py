"""``pneumonia run``: the main job end to end: tune, evaluate the best checkpoint once on test, export the
package, deploy it with Ray Serve, query it once, and say where everything is.

    pneumonia run [--config tuning/configs/quick.yaml] [--address ADDR] [--data DIR] [--set key=value ...]

Without ``--address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) it starts a new local Ray in-process (never
a cluster the machine has recorded: that takes ``--address auto``) and keeps serving until Ctrl-C; on a cluster it
returns and the Serve application stays up there.
"""

from __future__ import annotations

import csv
import os
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

from data.dataset import detect_layout, resolve_data_path
from data.download import DownloadError, download_medmnist
from evaluation.evaluate import EvaluationOptions, evaluate
from runtime.config import load_config
from runtime.local_ray import resolve_address
from runtime.paths import default_cache_dir, display_path
from serving.client import classify
from serving.http_proxy import claim_port, set_ingress_environment
from serving.launch import APP_NAME, serve_forever, serve_model
from tuning.config import DEFAULT_CONFIG, TuneConfig
from tuning.ensemble import resolve_experiment
from tuning.experiment import is_remote, local_storage
from tuning.search import run_search


def resolve_data(data: str | None, log: Callable[[str], None]) -> str:
    """--data, else $PNEUMONIA_DATA, else MedMNIST's npz in the cache (downloaded once); its layout is checked
    here, before any Ray work starts, so a wrong path fails in a second with what was expected."""
    if data or os.environ.get("PNEUMONIA_DATA"):
        path = resolve_data_path(data).resolve()
        detect_layout(path)
        return str(path)
    log(f"no --data and no PNEUMONIA_DATA: using MedMNIST's pneumoniamnist_224.npz in {default_cache_dir()}")
    try:
        return str(download_medmnist())
    except DownloadError as exc:
        raise DownloadError(
            f"{exc}. Without internet, pass --data DIR with the Kermany chest_xray folders (or set "
            "PNEUMONIA_DATA), or put pneumoniamnist_224.npz in the cache dir yourself."
        ) from None


FIRST_QUERY_TRIES = 20


def first_query(predictions: Path, url: str) -> tuple[str, dict]:
    """(film, answer): the first test film the endpoint classifies, so a user's first answer is one the gate
    accepts; if the first ``FIRST_QUERY_TRIES`` are all refused, the first one forced (labelled anyway, marked)."""
    token = os.environ.get("PNEUMONIA_API_TOKEN", "")
    with open(predictions, newline="") as f:
        films = [row["path"] for _, row in zip(range(FIRST_QUERY_TRIES), csv.DictReader(f))]
    for film in films:
        try:
            return film, classify(film, url, token)
        except urllib.error.HTTPError as error:
            if error.code != 422:
                raise
            error.close()
    return films[0], classify(films[0], url, token, force=True)


def summary_lines(best: dict, report: dict, report_dir: Path, package_dir: Path, url: str, sample: str,
                  answer: dict) -> list[str]:
    """The short block a run ends with: where things are, what was chosen, what test said, how to query."""
    test, intervals = report["test"], report["confidence_intervals"]

    def metric(name: str, label: str) -> str:
        low, high = intervals[name]
        scale, digits = (1, 3) if name == "auc" else (100, 1)
        return f"{label} {scale * test[name]:.{digits}f} ({scale * low:.{digits}f}-{scale * high:.{digits}f})"

    members = report["model"]["produced_by"].get("ensemble") or []
    chosen = (f"the mean of {len(members)} trials: " + ", ".join(f"{m['trial_id']} ({m['family']})" for m in members)
              if len(members) > 1 else f"trial {best['trial_id']} ({best['family']})")
    from tuning.progress import describe  # Ray Tune at import: loaded only once a search has run

    params = describe(best["params"])
    gate = report.get("ood")
    answered = f"{answer['label']}, P(pneumonia) {answer['probability']:.4f}"
    if answer.get("out_of_distribution"):
        answered += " (the gate would refuse it: out of distribution)"
    return [
        "",
        "== pneumonia run: done ==",
        f"experiment   {display_path(best['experiment'])}",
        f"model        {chosen}; best trial's config: {params}",
        (f"test split   {sum(map(sum, test['confusion_matrix']))} images, threshold {test['threshold']:.3f} from "
         "validation; 95 % CI:"),
        (f"             {metric('accuracy', 'accuracy %')}, {metric('sensitivity', 'sensitivity %')}, "
         f"{metric('specificity', 'specificity %')}, {metric('auc', 'AUC')}"),
        *([f"refused      {100 * gate['test_refusal_rate']:.1f} % of test films (film checks and gate); "
           + ", ".join(f"{k['kind']} {100 * k['detection_rate']:.0f} %" for k in gate["kinds"])] if gate else []),
        f"report       {display_path(report_dir / 'report.md')}",
        f"package      {display_path(package_dir)}",
        f"endpoint     {url}  (a page to drop films on: {url}/, OpenAPI: {url}/docs)",
        f"first query  {display_path(sample)} -> {answered}",
        f"try          curl -X POST -H 'Content-Type: image/jpeg' --data-binary @{display_path(sample)} {url}/predict",
        "",
    ]


def run_end_to_end(config_path: str | None = None, address: str | None = None, data: str | None = None,
                   overrides: list[str] | None = None, port: int = 8000, block: bool = True,
                   log: Callable[[str], None] = print, ingress: str = "auto",
                   allow_unauthenticated: bool = False) -> dict:
    """Search, evaluate once on test, export, serve, query once; blocks serving unless on a cluster. The endpoint
    listens on 127.0.0.1 here; on a cluster whose Serve listens beyond loopback it needs $PNEUMONIA_API_TOKEN or
    ``allow_unauthenticated`` (``serving.app.application``)."""
    started = time.time()
    address = resolve_address(address)  # inside `ray job submit`: that cluster (RAY_ADDRESS)
    data_path = resolve_data(data, log)
    if not address:  # the local Ray started below serves too: its port and HTTP ingress are settled first
        from serving.settings import ServeSettings  # pydantic: kept off `pneumonia --help`

        claim_port(port, log)
        queue = ServeSettings.parse({"package": "-"}).haproxy_queue(APP_NAME)  # serve_model's defaults
        log(f"HTTP ingress: {set_ingress_environment(ingress, port, queue)}")
    config = load_config(TuneConfig, config_path or DEFAULT_CONFIG, [*(overrides or []), f"train.data.path={data_path}"])
    best = run_search(config, address, log=log)
    experiment = Path(best["checkpoint_path"]).parent if is_remote(config.storage_path) else Path(best["experiment"])
    model_dir, produced_by = resolve_experiment(str(experiment), config.ensemble, log)
    # on storage every node reads (s3://, gs://, a shared mount) the package is published beside the experiments,
    # and that copy is served: a replica on any node of a cluster finds it (docs/cluster.md)
    shared = is_remote(config.storage_path) or config.shared_storage
    storage = local_storage(config.storage_path) if shared else None
    options = EvaluationOptions(target_sensitivity=config.target_sensitivity or None,
                                threshold_rule=config.threshold_rule, stability_films=config.stability_films)
    result = evaluate(model_dir, data=data_path, reports_dir=Path("reports"), artifacts_dir=Path("artifacts"), log=log,
                      options=options, produced_by=produced_by, publish_to=storage)
    url = serve_model(result.package, address=address, port=port, block=False, log=log,
                      allow_unauthenticated=allow_unauthenticated)
    sample, answer = first_query(result.report_dir / "predictions.csv", url)
    for line in summary_lines(best, result.report, result.report_dir, result.package_dir, url, sample, answer):
        log(line)
    log(f"first answer {time.time() - started:.0f} s after the start")
    summary = {"best": best, "report_dir": str(result.report_dir), "package_dir": str(result.package_dir),
               "url": url, "sample": sample, "answer": answer}
    if block and not address:
        serve_forever(log)
    return summary
