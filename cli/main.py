"""The ``pneumonia`` command: a thin dispatcher; each subcommand calls one function of one room (``models``,
``tuning``, ``evaluation``, ``serving``), and ``pneumonia run`` chains them (``cli.run``). Nothing imports it.

Heavy imports (TensorFlow, Ray, scikit-learn) happen inside the rooms' functions that need them, never at import,
so ``pneumonia --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.run import run_end_to_end
from data.config import DataConfig
from data.dataset import VALIDATION_SCHEMES, load_splits, summarize
from data.download import download_medmnist, unpack_zip
from evaluation.evaluate import EvaluationOptions, evaluate
from evaluation.exported import add_film_checks, stability_of_package
from models.config import TrainConfig
from runtime.config import ConfigError, load_config
from runtime.local_ray import run_command
from serving.client import predict_files
from serving.http_proxy import INGRESS_MODES
from serving.launch import serve_model
from tuning.dashboard import DEFAULT_PORT, DEFAULT_STORAGE, find_study, serve_study
from tuning.ensemble import resolve_experiment
from tuning.experiment import remote_storage
from tuning.search import build_parser as add_tune_arguments
from tuning.search import tune_from_args
from tuning.train import train


def _data_check(args: argparse.Namespace) -> int:
    summary = summarize(load_splits(args.data, args.val_fraction, args.seed, validation=args.validation))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['source']} ({summary['layout']} layout), fingerprint {summary['fingerprint']}")
    print(f"{'split':<6} {'NORMAL':>7} {'PNEUMONIA':>10} {'total':>6} {'patients':>9}")
    for name, row in summary["splits"].items():
        print(f"{name:<6} {row['NORMAL']:>7} {row['PNEUMONIA']:>10} {row['total']:>6} {row['patients']:>9}")
    print(f"train+val images: {summary['train_plus_val']}; patients in both train and val: {summary['patient_overlap']}")
    if summary["series"]:
        print(f"\n{'split':<6} {'series':<24} {'images':>7} {'patients':>9}  patient numbers")
        for row in summary["series"]:
            numbers = "-" if row["first"] is None else f"{row['first']}-{row['last']}"
            print(f"{row['split']:<6} {row['series']:<24} {row['images']:>7} {row['patients']:>9}  {numbers}")
        print()
    print(f"unreadable files: {len(summary['unreadable'])}")
    for path in summary["unreadable"]:
        print(f"  {path}")
    return 0


def _data_download(args: argparse.Namespace) -> int:
    if args.zip:
        if not args.dest:
            raise ConfigError("--zip needs --dest DIR (where the train/ and test/ folders go)")
        print(unpack_zip(args.zip, args.dest))
    else:
        print(download_medmnist(args.cache_dir, args.size, args.url, args.md5))
    return 0


def _load_train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.set or [])
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    return load_config(TrainConfig, args.config, overrides)


def _train(args: argparse.Namespace) -> int:
    train(_load_train_config(args), args.output)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """An experiment is first turned into its model directory by tuning (its best trial, or an ensemble)."""
    storage = None
    if args.experiment:
        model_dir, produced_by = resolve_experiment(args.experiment, args.ensemble)
        storage = remote_storage(json.loads((Path(args.experiment) / "best.json").read_text()).get("experiment"))
    elif args.ensemble != 1:
        raise ConfigError("an ensemble is built from a search's trials: use --experiment DIR with --ensemble")
    else:
        model_dir, produced_by = args.model, None
    options = EvaluationOptions(args.target_sensitivity, args.threshold_rule, not args.no_calibration, args.ood_method,
                                args.ood_quantile, not args.no_film_checks, not args.no_stability,
                                stability_films=args.stability_films)
    evaluate(model_dir, args.data, args.reports, args.artifacts, args.name, options=options, produced_by=produced_by,
             publish_to=storage)
    return 0


def _stability(args: argparse.Namespace) -> int:
    figures = stability_of_package(args.package, args.data, tuple(args.split or ["val"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _add_film_checks(args: argparse.Namespace) -> int:
    add_film_checks(args.package, args.data, args.artifacts)
    return 0


def _serve(args: argparse.Namespace) -> int:
    serve_model(args.model, args.replicas, args.address, args.host, args.port, ingress=args.ingress,
                allow_unauthenticated=args.allow_unauthenticated)
    return 0


def _predict(args: argparse.Namespace) -> int:
    return predict_files(args.images, args.url, args.token or "", args.explain, args.force)


def _run(args: argparse.Namespace) -> int:
    run_end_to_end(args.config, args.address, args.data, args.set, args.port, ingress=args.ingress,
                   allow_unauthenticated=args.allow_unauthenticated)
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    serve_study(find_study(args.experiment, args.storage_path, args.study or "", args.study_storage or ""), args.port)
    return 0


def _add_ingress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingress", choices=INGRESS_MODES, default="auto",
                        help="HTTP ingress of a local Ray: haproxy (Serve's high-throughput mode), python (Serve's "
                             "proxy), or auto: haproxy when Ray has its binary, as ray[serve] bundles one (default)")


def _add_allow_unauthenticated_option(parser: argparse.ArgumentParser, beyond_loopback: str) -> None:
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help=f"serve beyond loopback ({beyond_loopback}) without $PNEUMONIA_API_TOKEN, with a "
                             "warning; refused otherwise")


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="check or download the chest X-ray data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="counts per split and class, patients, overlap, unreadable files")
    check.add_argument("--data", help="data dir or .npz (default: $PNEUMONIA_DATA)")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.add_argument("--val-fraction", type=float, default=0.15)
    check.add_argument("--seed", type=int, default=42)
    check.add_argument("--validation", choices=VALIDATION_SCHEMES, default=DataConfig.validation,
                       help=f"how validation is carved from train (default {DataConfig.validation})")
    check.set_defaults(handler=_data_check)
    download = data_commands.add_parser("download", help="fetch MedMNIST's npz, or unpack a Kaggle/Mendeley zip")
    download.add_argument("--size", type=int, default=224, help="MedMNIST image size: 64, 128 or 224")
    download.add_argument("--cache-dir", help="default: $PNEUMONIA_CACHE or ~/.cache/pneumonia")
    download.add_argument("--url", help="download from this URL instead of Zenodo (needs --md5)")
    download.add_argument("--md5", help="expected MD5 of the file at --url")
    download.add_argument("--zip", help="a local Kaggle or Mendeley zip to unpack instead")
    download.add_argument("--dest", help="where to unpack --zip")
    download.set_defaults(handler=_data_download)


def _add_model_commands(commands) -> None:
    """train, tune and evaluate: the stages that make a model package."""
    train = commands.add_parser("train", help="train one configuration without Ray and write a model directory")
    train.add_argument("--config", help="YAML config (see tuning/configs/)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. epochs=3")
    train.add_argument("--data", help="data dir or .npz (default: data.path, else $PNEUMONIA_DATA)")
    train.add_argument("--output", help="model directory (default: output_dir/name)")
    train.set_defaults(handler=_train)

    tune = commands.add_parser("tune", help="Ray Tune + Optuna search over the model families (python -m tuning.search)")
    add_tune_arguments(tune).set_defaults(handler=tune_from_args)

    dashboard = commands.add_parser(
        "dashboard", help="optuna-dashboard on a search's Optuna study, live while it runs, on 127.0.0.1")
    dashboard.add_argument("experiment", nargs="?", metavar="EXPERIMENT",
                           help="its name under --storage-path or its directory (default: the study written last; "
                                "`pneumonia run` and `tune` print the command)")
    dashboard.add_argument("--storage-path", default=DEFAULT_STORAGE,
                           help=f"the search's storage_path (default {DEFAULT_STORAGE})")
    dashboard.add_argument("--study", help="the study's name, where the search continued an earlier one (study_name)")
    dashboard.add_argument("--study-storage", metavar="URL", help="the search's study_storage, where it set one")
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    dashboard.set_defaults(handler=_dashboard)

    evaluate = commands.add_parser(
        "evaluate", help="choose the threshold on validation, score the test split once, write report and package")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model directory (pneumonia train's output)")
    source.add_argument("--experiment", help="a tuning experiment dir holding best.json")
    evaluate.add_argument("--data", help="data dir or .npz (default: the model's data.path, else $PNEUMONIA_DATA)")
    evaluate.add_argument("--target-sensitivity", type=float, metavar="S",
                          help="screening threshold: the highest keeping validation sensitivity >= S")
    evaluate.add_argument("--threshold-rule", choices=("plateau", "youden"), default="plateau",
                          help="plateau (default): the centre of the thresholds whose validation Youden's J is within "
                               "0.01 of the best; youden: the best J itself")
    evaluate.add_argument("--no-calibration", action="store_true",
                          help="threshold and serve the model's own probabilities (default: Platt scaling fitted on "
                               "validation)")
    evaluate.add_argument("--ood-method", choices=("mahalanobis", "knn", "msp", "energy", "none"), default="mahalanobis",
                          help="the out-of-distribution gate's score (default mahalanobis; none = no gate)")
    evaluate.add_argument("--ood-quantile", type=float, default=0.995,
                          help="the gate refuses scores above this quantile of the validation films' (default 0.995)")
    evaluate.add_argument("--no-film-checks", action="store_true",
                          help="no checks before the model (default: refuse images too small, of a strip's shape, "
                               "blank or inverted; fitted on training films)")
    evaluate.add_argument("--reports", default="reports", help="reports go to REPORTS/NAME/ (default: reports)")
    evaluate.add_argument("--artifacts", default="artifacts", help="packages go to ARTIFACTS/VERSION/ (default: artifacts)")
    evaluate.add_argument("--ensemble", type=int, default=1, metavar="N",
                          help="with --experiment: evaluate the mean of its N best trials (default 1: the best)")
    evaluate.add_argument("--name", help="report name (default: <family>-<trial>, ensembleN-<best trial>, "
                          "or the training config's name)")
    evaluate.set_defaults(handler=_evaluate)

    evaluate.add_argument("--stability-films", type=int, default=0, metavar="N",
                          help="measure stability and fit the band on a fixed stratified sample of N films per split "
                               "(quick runs; default 0: every film)")
    evaluate.add_argument("--no-stability", action="store_true",
                          help="skip the stability measurement and so the borderline band (default: every validation "
                               "and test film re-encoded six benign ways, |change in P| and label flips reported, "
                               "and the band of answers too near the threshold to hold fitted on validation's)")

    stability = commands.add_parser(
        "stability", help="how far a package's answers move when the same films are re-encoded benignly (PNG of "
                          "Pillow's pixels, JPEG q95/q85, +-1 grey level, 2 %% resize); reads images, no labels")
    stability.add_argument("--package", required=True, help="the package (artifacts/VERSION)")
    stability.add_argument("--data", help="the data it was trained on (default: its config's data.path)")
    stability.add_argument("--split", action="append", choices=("val", "test"),
                           help="which films (repeatable; default: val)")
    stability.add_argument("--json", help="also write the figures to this file")
    stability.set_defaults(handler=_stability)

    checks = commands.add_parser(
        "add-film-checks", help="give a package made before the film checks existed its checks (blank, too small, "
                                "strip, inverted), fitted on its training films; the test split is not read")
    checks.add_argument("--package", required=True, help="the evaluated package (artifacts/VERSION)")
    checks.add_argument("--data", help="the data it was trained on (default: its config's data.path)")
    checks.add_argument("--artifacts", default="artifacts", help="the new package goes to ARTIFACTS/VERSION-checks/")
    checks.set_defaults(handler=_add_film_checks)


def _add_serving_commands(commands) -> None:
    """serve and predict, and run: the whole job ending in a served endpoint."""
    serve = commands.add_parser("serve", help="deploy a model package with Ray Serve and keep serving")
    serve.add_argument("--model", required=True, help="model package (artifacts/VERSION, or s3://.../packages/VERSION "
                                                      "as pneumonia run publishes it on remote storage)")
    serve.add_argument("--replicas", type=int, default=0, help="fixed replica count (default: autoscaling 1-2)")
    serve.add_argument("--address", help="Ray cluster to join: HOST:PORT of its head, or auto for the one `ray start` recorded on this machine (default: $RAY_ADDRESS, else a new local Ray of this command's own)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1); beyond loopback it needs "
                       "$PNEUMONIA_API_TOKEN or --allow-unauthenticated")
    serve.add_argument("--port", type=int, default=8000)
    _add_ingress_option(serve)
    _add_allow_unauthenticated_option(serve, "--host 0.0.0.0, or a cluster's Serve listening there")
    serve.set_defaults(handler=_serve)

    predict = commands.add_parser("predict", help="classify images with a running endpoint")
    predict.add_argument("images", nargs="+", help="JPEG, PNG or DICOM files")
    predict.add_argument("--url", default="http://127.0.0.1:8000")
    predict.add_argument("--token", help="bearer token (default: $PNEUMONIA_API_TOKEN)")
    predict.add_argument("--explain", metavar="OUT.png", help="also save the Grad-CAM overlay (OUT-N.png for several)")
    predict.add_argument("--force", action="store_true",
                         help="classify images the out-of-distribution gate refuses (research use; marked in the output)")
    predict.set_defaults(handler=_predict)

    run = commands.add_parser("run", help="the main job: tune, evaluate on test once, export, serve, query")
    run.add_argument("--config", help="tuning config (default: tuning/configs/quick.yaml)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a tuning config key")
    run.add_argument("--data", help="data dir or .npz (default: $PNEUMONIA_DATA, else MedMNIST in the cache)")
    run.add_argument("--address", help="Ray cluster to join: HOST:PORT of its head, or auto for the one `ray start` "
                     "recorded on this machine (default: $RAY_ADDRESS, else a new local Ray, serving until Ctrl-C)")
    run.add_argument("--port", type=int, default=8000, help="Serve HTTP port (default 8000)")
    _add_ingress_option(run)
    _add_allow_unauthenticated_option(run, "a cluster's Serve listening beyond 127.0.0.1")
    run.set_defaults(handler=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumonia", description="Pneumonia detection on chest X-rays with Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(commands)
    _add_model_commands(commands)
    _add_serving_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A :class:`PneumoniaError` (a user mistake: data, config, package, search) is one
    line on stderr and exit code 2; anything else is a bug and keeps its traceback (see
    ``runtime.local_ray.run_command``)."""
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
