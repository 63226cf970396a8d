"""Ray Tune: a search over Stage 1's alpha and beta, each trial a Ray Train run of Stage 1.

As Ray 2.60 documents Train + Tune: every trial is a small driver function that builds the
Stage 1 `TorchTrainer` (the same `train_stage1` as `allmrec train stage1`) with Tune's
`TuneReportCallback`, so each epoch's validation metric reaches Tune and ASHA can stop a
poor trial early. The driver needs almost no CPU (`with_resources(cpu=0.01)`); the Train
workers ask for theirs, and `max_concurrent_trials` keeps the trials that fit.

Results go to `tune.storage` (default `<run_dir>/tune`; an s3://, gs:// or shared path on a
cluster); an interrupted search continues with `Tuner.restore` (`allmrec tune --resume`)
without repeating finished trials, and a failed trial is retried `tune.max_failures` times.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from allmrec.config import Config, config_to_dict
from allmrec.console import say
from allmrec.storage import RunStorage, join, open_run
from allmrec.tuning import RESULT_FILES, check_search, write_results

log = logging.getLogger(__name__)


def stage1_trial(trial: dict) -> None:
    """The Tune trainable: one Stage 1 run through Ray Train with this trial's alpha, beta."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from allmrec.distributed.train_stage1 import train_stage1

    config = Config.model_validate(trial["config"])
    config.stage1.alpha = float(trial["alpha"])
    config.stage1.beta = float(trial["beta"])
    config.stage1.eval_every = 1  # ASHA compares trials on every epoch's metric
    train_stage1(
        config,
        trial["run"],
        # beside the experiment, in its storage: a restored trial finds its Train run there
        storage=join(trial["train_storage"], tune.get_context().get_trial_id()),
        callbacks=[TuneReportCallback()],
        write_artifact=False,
    )


STOPPED_FILE = "stopped_by_asha.jsonl"
RUNGS_FILE = "asha_rungs.jsonl"
# The current search's `tune/` on this driver: a restored scheduler was pickled with the
# path of the driver that started the search (another machine, another cache).
_decisions_dir: list[Path] = []


class RecordingASHA(ASHAScheduler):
    """ASHA that writes down what it decides, beside the results on the driver, so that a
    resumed search decides as the uninterrupted one would and the summary reports the
    scheduler's own decisions.

    - Every result it records at a rung (`asha_rungs.jsonl`): Ray keeps the rungs in memory
      only, so a search resumed after a crash started with empty rungs, where a trial that
      arrives first is never cut. A resumed search puts them back as its trials are added.
    - Every trial it cuts (`stopped_by_asha.jsonl`): a trial with fewer epochs than the
      maximum may also be one that failed or was interrupted. Reaching max_t (also a STOP
      for ASHA) is not a cut. A trial cut just before a crash that Tune restores anyway is
      cut again at the epoch where it was cut.
    """

    def __init__(self, decisions_dir: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        if len(self._brackets) != 1:  # Ray draws a bracket at random on each add
            raise ValueError("RecordingASHA restores rungs of a single bracket")
        self.decisions_dir = str(decisions_dir)
        self._remembered: dict[str, dict[float, float]] | None = None  # read when first needed
        self._cut: dict[str, int] = {}

    def __getstate__(self) -> dict:
        # pickled into the experiment: what it read from the files is read again on restore
        return {**self.__dict__, "_remembered": None, "_cut": {}}

    @property
    def _dir(self) -> Path:
        return _decisions_dir[-1] if _decisions_dir else Path(self.decisions_dir)

    def _load_decisions(self) -> dict[str, dict[float, float]]:
        if getattr(self, "_remembered", None) is None:
            self._remembered = read_rungs(self._dir)
            self._cut = read_stopped(self._dir)
        return self._remembered

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        remembered = self._load_decisions().get(trial.trial_id, {})
        for milestone, recorded in self._trial_info[trial.trial_id]._rungs:
            if milestone in remembered:
                recorded[trial.trial_id] = remembered[milestone]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_decisions()
        cut_at = self._cut.get(trial.trial_id)
        if cut_at is not None and result.get(self._time_attr, 0) >= cut_at:
            return TrialScheduler.STOP  # where it was cut before a crash
        rungs = self._trial_info[trial.trial_id]._rungs  # every trial is added first
        known = {milestone for milestone, recorded in rungs if trial.trial_id in recorded}
        action = super().on_trial_result(tune_controller, trial, result)
        lines = []
        for milestone, recorded in rungs:
            if trial.trial_id in recorded and milestone not in known:
                value = float(recorded[trial.trial_id])
                lines.append({"trial_id": trial.trial_id, "rung": milestone, "value": value})
        self._append(RUNGS_FILE, lines)
        epoch = result.get(self._time_attr)
        if action == TrialScheduler.STOP and epoch is not None and epoch < self._max_t:
            self._cut[trial.trial_id] = int(epoch)
            self._append(STOPPED_FILE, [{"trial_id": trial.trial_id, "at": epoch}])
        return action

    def _append(self, name: str, lines: list[dict]) -> None:
        if lines:
            with open(self._dir / name, "a") as out:
                out.writelines(json.dumps(line) + "\n" for line in lines)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    # a line the crash cut short is not a decision
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def read_stopped(tune_dir: Path) -> dict[str, int]:
    """trial id -> the epoch at which ASHA cut it."""
    return {line["trial_id"]: int(line["at"]) for line in _jsonl(Path(tune_dir) / STOPPED_FILE)}


def read_rungs(tune_dir: Path) -> dict[str, dict[float, float]]:
    """trial id -> {rung (milestone): the result ASHA recorded there}."""
    rungs: dict[str, dict[float, float]] = {}
    for line in _jsonl(Path(tune_dir) / RUNGS_FILE):
        rungs.setdefault(line["trial_id"], {})[line["rung"]] = float(line["value"])
    return rungs


def _space(config: Config) -> dict:
    cfg = config.tune
    if cfg.search == "grid":
        return {"alpha": tune.grid_search(cfg.alpha), "beta": tune.grid_search(cfg.beta)}
    draw = tune.loguniform if cfg.log_uniform else tune.uniform
    return {"alpha": draw(*cfg.alpha_range), "beta": draw(*cfg.beta_range)}


class TrialLines(tune.Callback):
    """The search's progress as allmrec's lines: each trial's alpha, beta and metric at every
    epoch it reports, and the best so far. (Tune's own status lines print a trial's whole
    parameter space, here the whole config, some 3,000 characters every half minute: the
    search runs with Tune's output off.)"""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.best: tuple[float, str] | None = None

    def _name(self, trial) -> str:
        config = trial.config
        return f"{trial.trial_id} (alpha={config['alpha']:.4g}, beta={config['beta']:.4g})"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if value is None:
            return
        if self.best is None or value > self.best[0]:
            self.best = (float(value), self._name(trial))
        say(
            "tune",
            f"{self._name(trial)} epoch {result.get('epoch')}: {self.metric}="
            f"{value:.4f}; best so far {self.best[0]:.4f}, {self.best[1]}",
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        say("tune", f"{self._name(trial)} ended; {done} of {len(trials)} trials done")


def _tracking_callbacks(config: Config, run_home: str) -> list:
    """Ray Tune's MLflow callback, one MLflow run per trial under `<experiment>/tune`, when
    `tracking.mlflow_uri` is set."""
    if not config.tracking.mlflow_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from allmrec.tracking import experiment_name, metric_name, require_mlflow, tracking_uri

    require_mlflow()

    class _Callback(MLflowLoggerCallback):
        """MLflow refuses "@" in metric names (valid_hit@1): logged as the stages log them."""

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            named = {metric_name(k) if isinstance(k, str) else k: v for k, v in result.items()}
            super().log_trial_result(iteration, trial, named)

    return [
        _Callback(
            tracking_uri=tracking_uri(config),
            experiment_name=f"{experiment_name(config, run_home)}/tune",
            tags={"allmrec.stage": "tune", "allmrec.run": run_home},
        )
    ]


def search_alpha_beta(
    config: Config, run_dir: str | Path | RunStorage, resume: bool = False
) -> dict:
    """Run (or resume) the search; writes the tables, the plot and best.yaml to the run's
    `tune/`; returns a summary with the best trial."""
    from allmrec.data.prepared import load_prepared
    from allmrec.distributed.runtime import check_fits_locally
    from allmrec.training.cf import load_cf_model

    cfg, scaling = config.tune, config.stage1.scaling
    check_search(cfg, config.stage1.epochs)
    run = open_run(run_dir)
    run_dir = run.pull("data", "cf")
    load_cf_model(run_dir, load_prepared(run_dir))  # a missing input fails now, clearly
    check_fits_locally("stage1.scaling", scaling.num_workers, scaling.cpus_per_worker)
    storage = cfg.storage or run.uri("tune")
    path = join(storage, cfg.name)
    # The trial only drives its Train run; Tune refuses an empty bundle, so a token CPU share.
    trainable = tune.with_resources(stage1_trial, {"cpu": 0.01})
    (run_dir / "tune").mkdir(parents=True, exist_ok=True)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ValueError(f"tune: nothing to resume at {path} (run `allmrec tune` first)")
        log.info("resuming the search at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        for name in (STOPPED_FILE, RUNGS_FILE):  # a new search's decisions
            (run_dir / "tune" / name).unlink(missing_ok=True)
        tuner = _new_tuner(config, run, run_dir, trainable, storage, path)
    _decisions_dir[:] = [run_dir / "tune"]
    try:
        grid = tuner.fit()
    finally:
        _decisions_dir.clear()
    rows = _trial_rows(grid, cfg.metric, read_stopped(run_dir / "tune"))
    best = write_results(rows, run_dir / "tune", cfg.metric, config.stage1.epochs)
    decisions = (STOPPED_FILE, RUNGS_FILE)
    files = [f for f in (*RESULT_FILES, *decisions) if (run_dir / "tune" / f).is_file()]
    run.push("tune", files=files)
    return {"experiment": path, "trials": rows, "best": best}


def _new_tuner(
    config: Config, run, run_dir: Path, trainable, storage: str, path: str
) -> tune.Tuner:
    """A fresh search into `path` (`storage`/`tune.name`): ASHA over the space, as many trials
    at a time as the cluster's CPUs hold (or `tune.max_concurrent_trials`)."""
    cfg, scaling = config.tune, config.stage1.scaling
    per_trial = scaling.num_workers * scaling.cpus_per_worker
    concurrent = cfg.max_concurrent_trials or max(
        1, math.floor(ray.cluster_resources().get("CPU", 1) / per_trial)
    )
    log.info(
        "searching alpha, beta (%s) into %s, %d trial(s) at a time",
        cfg.search,
        path,
        concurrent,
    )
    return tune.Tuner(
        trainable,
        param_space={
            "config": config_to_dict(config),
            "run": run.home,
            "train_storage": join(storage, f"{cfg.name}-train"),
            **_space(config),
        },
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode="max",
            scheduler=RecordingASHA(
                run_dir / "tune",
                # the Train run's epoch, not Tune's count of reports: a restored trial's count
                # starts again at 1 while its Train run resumes from its last checkpoint
                time_attr="epoch",
                max_t=config.stage1.epochs,
                grace_period=cfg.grace_period,
                reduction_factor=cfg.reduction_factor,
            ),
            num_samples=1 if cfg.search == "grid" else cfg.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[TrialLines(cfg.metric), *_tracking_callbacks(config, run.home)],
            verbose=0,  # Tune's status lines: TrialLines says what a user needs
        ),
    )


def _trial_rows(grid, metric: str, stopped: dict[str, int]) -> list[dict]:
    """A row per trial: its alpha and beta, its best `metric`, the epochs it ran and whether
    the scheduler stopped it (its own recorded decision, not inferred from the epochs)."""
    rows = []
    for n, result in enumerate(grid):
        history = result.metrics_dataframe
        best = float(history[metric].max()) if history is not None and metric in history else None
        rows.append(
            {
                "trial": Path(result.path).name if result.path else str(n),
                "alpha": float(result.config["alpha"]),
                "beta": float(result.config["beta"]),
                "metric": best,
                "epochs": int((result.metrics or {}).get("epoch", 0)),
                "stopped_early": (result.metrics or {}).get("trial_id") in stopped,
                "status": "error" if result.error else "done",
            }
        )
    return rows
