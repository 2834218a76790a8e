"""What a search shows while it runs: one line per epoch, and where the search stands.

Where it stands: trials done (of them stopped early by ASHA), running and errored out of the total, the best
validation AUC so far and its trial, elapsed time against the time budget. On a terminal that is a live
status line under the events (rich); in logs, CI and ``ray job submit`` it is a plain line after each
trial's start and end. A failing trial's error is printed in full, with the path of its log.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ray import tune

from models.package import METRIC


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def describe(params: dict) -> str:
    """A trial's sampled parameters in a line: short keys, 3 significant digits, augmentations that are off left out."""
    shown: dict[str, str] = {}  # by short name: lite.image_size and model.image_size say the same once
    for key, value in sorted(params.items()):
        name = key.split(".")[-1]
        if key == "model.family" or (name.startswith("augment_") and not value) or name in shown:
            continue
        shown[name] = f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
    return ", ".join(shown.values())


class SearchProgress(tune.Callback):
    """A Tune callback; picklable (Tune saves callbacks with the experiment state), its display is not kept."""

    def __init__(self, total: int, epochs: int, budget_s: float = 0.0, live: bool | None = None):
        self.total, self.epochs, self.budget_s = total, epochs, budget_s
        self.live = sys.stdout.isatty() if live is None else live
        self.started = time.time()
        self.running: set[str] = set()
        self.told: set[str] = set()  # trials whose precision the console has named
        self.done = self.stopped_early = self.errors = 0
        self.best_auc, self.best_trial = -math.inf, ""
        self._display = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_display": None}

    # Tune saves these with the experiment state, so a resumed search counts on from where it stopped
    # (not the errors: `pneumonia tune --resume` retries errored trials)
    _KEPT = ("done", "stopped_early", "best_auc", "best_trial")

    def get_state(self) -> dict:
        return {key: getattr(self, key) for key in self._KEPT}

    def set_state(self, state: dict) -> None:
        self.__dict__.update({key: state[key] for key in self._KEPT if key in state})

    def status(self) -> str:
        best = f"best val AUC {self.best_auc:.4f} ({self.best_trial})" if self.best_trial else "no result yet"
        budget = f" of {_clock(self.budget_s)}" if self.budget_s else ""
        return (f"{self.done}/{self.total} trials done ({self.stopped_early} stopped early, {self.errors} errored), "
                f"{len(self.running)} running | {best} | {_clock(time.time() - self.started)}{budget}")

    def _say(self, line: str, with_status: bool = False) -> None:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            if self._display is None:
                self._display = Live(console=Console(), transient=True, auto_refresh=False)
                self._display.start()
            self._display.console.print(line, markup=False, highlight=False)
            self._display.update(self.status(), refresh=True)
            return
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
        if with_status:
            print(f"[{time.strftime('%H:%M:%S')}] {self.status()}", flush=True)

    @staticmethod
    def _name(trial) -> str:
        return f"{trial.trial_id} {trial.config.get('model.family', '?')}"

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._say(f"{self._name(trial)} started: {describe(trial.config)}", with_status=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        auc = result.get(METRIC, float("nan"))
        if auc > self.best_auc:
            self.best_auc, self.best_trial = auc, trial.trial_id
        # the precision the trial trains in (mixed_precision: auto measures it), said once, with its first epoch
        precision = f", {result['precision']}" if result.get("precision") and trial.trial_id not in self.told else ""
        self.told.add(trial.trial_id)
        self._say(f"{self._name(trial)} epoch {result.get('epoch', '?')}/{self.epochs}: val AUC {auc:.4f}, "
                  f"val acc {result.get('val_accuracy', float('nan')):.3f}, loss {result.get('loss', float('nan')):.4f}, "
                  f"{result.get('images_per_sec', 0):.0f} img/s{precision}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        last = (trial.last_result or {}).get("epoch", self.epochs)
        best = trial.metric_analysis.get(METRIC, {}).get("max", float("nan"))
        if last < self.epochs:
            self.stopped_early += 1
            self._say(f"{self._name(trial)} stopped early by ASHA after epoch {last} (best val AUC {best:.4f})", True)
        else:
            self._say(f"{self._name(trial)} finished (best val AUC {best:.4f})", True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(f"{self._name(trial)} lost its worker or failed; retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errors += 1
        error_file = Path(trial.local_path or trial.path) / "error.txt"
        try:
            error = error_file.read_text().strip()
        except OSError:
            error = "(no error.txt was written)"
        self._say(f"{self._name(trial)} failed for good (max_failures reached):\n{error}\n"
                  f"its log: {Path(trial.local_path or trial.path) / 'trial.log'}; error: {error_file}", True)

    def on_experiment_end(self, trials, **info):
        if self._display is not None:
            self._display.stop()
            self._display = None
        print(f"search: {self.status()}", flush=True)
