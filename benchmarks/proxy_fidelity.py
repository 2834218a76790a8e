"""Does the proxy search rank configurations as full-size training does? A check for
``benchmarks/search_strategies.py``, whose sampler comparison is only worth what its proxy is.

A few configurations are drawn from the proxy's space (``tuning/configs/proxy.yaml``, Optuna's random sampler,
fixed seed). Each is trained twice, one after the other, each in a ``pneumonia train`` process of its own:
as the proxy trains it (its image size, its 1,000-film subset, its epochs) and at full size (``--full-size``
per family, every training film, ``--full-epochs``). Reported: each configuration's best validation AUC both
ways, and the rank correlations (Spearman, Kendall) between the two columns.

Usage: python -m benchmarks.proxy_fidelity --data ../shared/data/chest_xray [--configs 6] [--seed 0]
       [--full-epochs 5] --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FULL_SIZE = {"cnn": 128, "inception": 128, "efficientnet_lite0": 192}  # the sizes the full searches train at


def draw(config, count: int, seed: int) -> list[dict]:
    """``count`` parameter sets of the proxy's space, as a random search would draw them."""
    import optuna

    from tuning.search_space import DefineByRun

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    space, drawn = DefineByRun(config.space), []
    for _ in range(count):
        trial = study.ask()
        drawn.append(space(trial))
        study.tell(trial, 0.0)
    return drawn


def train_once(train_config, directory: Path) -> float:
    """Best validation AUC of one ``pneumonia train`` run of ``train_config`` (a TrainConfig)."""
    from runtime.config import to_dict

    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(train_config)))
    subprocess.run([sys.executable, "-m", "cli.main", "train", "--config", str(path), "--output",
                    str(directory / "model")], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    metadata = json.loads((directory / "model" / "metadata.json").read_text())
    return float(metadata["validation"]["auc"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default=str(REPO / "tuning" / "configs" / "proxy.yaml"))
    parser.add_argument("--configs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-epochs", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import dataclasses

    from scipy.stats import kendalltau, spearmanr

    from runtime.config import load_config, to_dict
    from tuning.config import TuneConfig
    from tuning.trainable import trial_config

    config = load_config(TuneConfig, args.config, [f"train.data.path={Path(args.data).resolve()}"])
    base = to_dict(config.train)
    rows = []
    for index, params in enumerate(draw(config, args.configs, args.seed)):
        proxy = trial_config(base, params)
        full = dataclasses.replace(
            proxy, epochs=args.full_epochs,
            data=dataclasses.replace(proxy.data, max_train_images=0),
            model=dataclasses.replace(proxy.model, image_size=FULL_SIZE[proxy.model.family]))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "proxy").mkdir()
            (Path(tmp) / "full").mkdir()
            row = {"params": params, "family": proxy.model.family,
                   "proxy_val_auc": train_once(proxy, Path(tmp) / "proxy"),
                   "full_val_auc": train_once(full, Path(tmp) / "full")}
        rows.append(row)
        print(f"{index}: {row['family']} proxy {row['proxy_val_auc']:.4f} full {row['full_val_auc']:.4f}", flush=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    proxy_aucs = [row["proxy_val_auc"] for row in rows]
    full_aucs = [row["full_val_auc"] for row in rows]
    result = {"args": vars(args), "rows": rows,
              "spearman": float(spearmanr(proxy_aucs, full_aucs).statistic),
              "kendall": float(kendalltau(proxy_aucs, full_aucs).statistic)}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"rank correlation over {len(rows)} configurations: Spearman {result['spearman']:.2f}, "
          f"Kendall {result['kendall']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
