"""``pneumonia run``: the main job end to end: tune, evaluate the best checkpoint once on test, export the
package, deploy it with Ray Serve, query it once, and say where everything is.

    pneumonia run [--config tuning/configs/quick.yaml] [--address ADDR] [--data DIR] [--set key=value ...]

Without ``--address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) it starts a local Ray in-process and
keeps serving until Ctrl-C; on a cluster it returns and the Serve application stays up there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "quick.yaml"


def resolve_data(data: str | None, log: Callable[[str], None]) -> str:
    """--data, else $PNEUMONIA_DATA, else MedMNIST's npz in the cache (downloaded once); its layout is checked
    here, before any Ray work starts, so a wrong path fails in a second with what was expected."""
    if data or os.environ.get("PNEUMONIA_DATA"):
        from models.dataset import detect_layout, resolve_data_path

        path = resolve_data_path(data).resolve()
        detect_layout(path)
        return str(path)
    from models.download import DownloadError, default_cache_dir, download_medmnist

    log(f"no --data and no PNEUMONIA_DATA: using MedMNIST's pneumoniamnist_224.npz in {default_cache_dir()}")
    try:
        return str(download_medmnist())
    except DownloadError as exc:
        raise DownloadError(
            f"{exc}. Without internet, pass --data DIR with the Kermany chest_xray folders (or set "
            "PNEUMONIA_DATA), or put pneumoniamnist_224.npz in the cache dir yourself."
        ) from None


def run_end_to_end(config_path: str | None = None, address: str | None = None, data: str | None = None,
                 overrides: list[str] | None = None, port: int = 8000, block: bool = True,
                 log: Callable[[str], None] = print, ingress: str = "auto") -> dict:
    from models.config import load_config
    from serving.client import classify
    from serving.launch import serve_forever, serve_model, set_ingress_environment
    from tuning.config import TuneConfig
    from tuning.evaluate import evaluate
    from tuning.experiment import is_remote
    from tuning.search import run_search

    address = address or os.environ.get("RAY_ADDRESS") or None  # inside `ray job submit`: that cluster
    data_path = resolve_data(data, log)
    if not address:  # the local Ray started below serves too: its HTTP ingress is chosen before it starts
        log(f"HTTP ingress: {set_ingress_environment(ingress)}")
    config = load_config(TuneConfig, config_path or DEFAULT_CONFIG, [*(overrides or []), f"train.data.path={data_path}"])
    best = run_search(config, address, log=log)
    experiment = Path(best["checkpoint_path"]).parent if is_remote(config.storage_path) else Path(best["experiment"])
    result = evaluate(experiment=str(experiment), data=data_path,
                      reports_dir=Path("reports"), artifacts_dir=Path("artifacts"), log=log,
                      ensemble=config.ensemble)
    url = serve_model(str(result.package_dir), address=address, port=port, block=False, log=log)
    first = result.report_dir / "predictions.csv"
    with open(first) as f:
        next(f)
        sample = next(f).split(",")[0]
    answer = classify(sample, url, os.environ.get("PNEUMONIA_API_TOKEN", ""))
    test = result.report["test"]
    log("")
    log(f"experiment:     {best['experiment']}")
    log(f"best config:    trial {best['trial_id']} ({best['family']}): "
        + ", ".join(f"{k}={v}" for k, v in sorted(best["params"].items())))
    log(f"test metrics:   threshold {test['threshold']:.4f} (chosen on validation)")
    log(f"  accuracy {test['accuracy']:.4f}  AUC {test['auc']:.4f}  sensitivity {test['sensitivity']:.4f}  "
        f"specificity {test['specificity']:.4f}  (on {sum(map(sum, test['confusion_matrix']))} test images)")
    log(f"report:         {result.report_dir / 'report.md'}")
    log(f"package:        {result.package_dir}")
    log(f"endpoint:       {url}  ({url}/ in a browser)")
    log(f"queried once:   {sample} -> {answer['label']} {answer['probability']:.4f}")
    log(f"try:            curl -X POST -H 'Content-Type: image/jpeg' --data-binary @{sample} {url}/predict")
    summary = {"best": best, "report_dir": str(result.report_dir), "package_dir": str(result.package_dir),
               "url": url, "sample": sample, "answer": answer}
    if block and not address:
        log("serving until Ctrl-C")
        serve_forever(address)
    return summary
