"""Early stopping for a sweep: ASHA within groups of trials whose losses are comparable
(same lambda, and unless told otherwise the same architecture).
"""

from __future__ import annotations

import json

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

TIME_ATTR, METRIC = "step", "val_loss"  # what trials report and ASHA compares


class PerLambdaASHA(FIFOScheduler):
    """ASHA within groups of trials whose losses are comparable: same lambda (the loss is
    lambda * 255^2 * MSE + bpp, so losses at different lambdas say nothing about each other)
    and, unless compare_across_architectures, the same architecture, since the question a
    sweep answers is each architecture's best (N, M) per lambda.

    One AsyncHyperBandScheduler per group, dispatched by the trial's config; time is the
    training step. Two kinds of trial are never stopped: the zoo-default (N, M) trials (the
    baseline of the report's BD-rate; they still set the rung cutoffs) and a trial at its step
    budget (it is about to finish by itself and must reach its bitrate check).
    On a restored sweep, the trials recorded before the interruption are replayed into their
    groups from their result logs, so the rungs hold what they held before.
    Trials start in the space's order (FIFO): baselines first.
    """

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float = 2.0,
                 compare_across_architectures: bool = False, metric: str = METRIC, mode: str = "min",
                 time_attr: str = TIME_ATTR):
        super().__init__()
        self._args = dict(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t,
                          grace_period=min(grace_period, max_t), reduction_factor=reduction_factor,
                          stop_last_trials=False)
        self._metric = metric
        self._across = compare_across_architectures
        self._groups: dict[tuple, AsyncHyperBandScheduler] = {}
        self._group_of: dict[str, tuple] = {}
        self.stopped: set[str] = set()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are fixed here; the sweep's TuneConfig sets none

    def group_key(self, config: dict) -> tuple:
        t = config["trial"]
        return (float(t["lmbda"]),) if self._across else (float(t["lmbda"]), t["architecture"])

    def _asha(self, trial) -> AsyncHyperBandScheduler | None:
        return self._groups.get(self._group_of.get(trial.trial_id))

    def on_trial_add(self, tune_controller, trial):
        key = self.group_key(trial.config)
        asha = self._groups.setdefault(key, AsyncHyperBandScheduler(**self._args))
        self._group_of[trial.trial_id] = key
        asha.on_trial_add(tune_controller, trial)
        if trial.last_result:  # restored from an interrupted sweep
            for result in _past_results(trial):
                asha.on_trial_result(tune_controller, trial, result)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._asha(trial).on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            if trial.config["trial"].get("zoo_default") or result.get(TIME_ATTR, 0) >= self._args["max_t"]:
                return TrialScheduler.CONTINUE
            self.stopped.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict):
        asha = self._asha(trial)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        asha = self._asha(trial)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"PerLambdaASHA: {len(self._groups)} group(s), {len(self.stopped)} trial(s) stopped early"


def _past_results(trial) -> list[dict]:
    """A restored trial's reported results, oldest first (its result.json on storage)."""
    results = []
    try:
        fs = trial.storage.storage_filesystem
        with fs.open_input_stream(f"{trial.path}/result.json") as f:
            for line in f.read().decode().splitlines():
                if line.strip():
                    results.append(json.loads(line))
    except (OSError, ValueError, RuntimeError):
        pass
    return [r for r in results if TIME_ATTR in r and METRIC in r] or [trial.last_result]
