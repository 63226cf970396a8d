"""Experiment tracking with MLflow (optional: `pip install 'allmrec[tracking]'`).

With `tracking.mlflow_uri` set, every stage of the chain is one MLflow run named after the
stage, under one experiment per run directory: its declared config settings and seed as
parameters, its per-epoch history (Stage 2's learning curve by training prompts) as metric
series, its final metrics, and where its outputs are (tags; the small plots and the manifest
as artifacts). A Train stage opens its run when it starts (`open_live_run`) and logs every
report of its workers as it comes (`log_report`, from a Ray Train callback), so a long stage
can be watched in the MLflow UI; the rest is logged when the stage finishes (`log_stage`; a
stage skipped as current, the first time it is seen).
Tune's trials log through Ray Tune's own MLflow callback (allmrec.distributed.tune_alpha_beta)
into `<experiment>/tune`. Nothing here needs Ray.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from allmrec.config import Config, ConfigError
from allmrec.stages import run_name, stage_inputs

log = logging.getLogger(__name__)

# MLflow names allow letters, digits, _ - . space : and /; "hit@1" becomes "hit_at_1".
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. :/]")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
_SMALL_ARTIFACTS = ("manifest.json", "history.json", "results.md")


def metric_name(name: str) -> str:
    return _NOT_ALLOWED.sub("_", name.replace("@", "_at_"))


def experiment_name(config: Config, run_home: str) -> str:
    return config.tracking.experiment or f"allmrec:{run_home}"


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError(
            "tracking.mlflow_uri is set, but MLflow is not installed: "
            "pip install 'allmrec[tracking]' (or unset tracking.mlflow_uri)"
        ) from None
    return mlflow


def tracking_uri(config: Config) -> str:
    """`tracking.mlflow_uri` as MLflow takes it: a plain path becomes an absolute file: URI.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless
    MLFLOW_ALLOW_FILE_STORE is true; a config that names one has chosen it, so it is allowed
    (in this process: Tune's callback logs from the driver too)."""
    uri = config.tracking.mlflow_uri
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a.b': leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _numbers(tree: dict) -> dict[str, float]:
    return {
        metric_name(k): float(v)
        for k, v in flatten(tree).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _series(stage_dir: Path) -> list[tuple[str, float, int]]:
    """(metric, value, step) of the stage's history: per epoch, and Stage 2's learning curve
    by training prompts (`curve/...`)."""
    path = stage_dir / "history.json"
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text())
    points = []
    for row in recorded.get("history", []):
        step = int(row.get("epoch", len(points)))
        points += [(k, v, step) for k, v in _numbers(row).items() if k != "epoch"]
    for row in recorded.get("curve", []):
        step = int(row["prompts"])
        points += [(f"curve/{k}", v, step) for k, v in _numbers(row).items() if k != "prompts"]
    return points


def _client(uri: str):
    if uri.startswith("file:"):  # what tracking_uri allows, in whatever process logs
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return require_mlflow().MlflowClient(tracking_uri=uri)


def _experiment_id(client, config: Config, run_home: str) -> str:
    experiment = experiment_name(config, run_home)
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment)


def _params(inputs: dict) -> list:
    from mlflow.entities import Param

    settings = flatten(inputs["settings"]) | {"seed": inputs["seed"]}
    settings |= {f"upstream.{k}": v for k, v in inputs["upstream"].items()}
    return [Param(k, json.dumps(v)[:_MAX_PARAM_CHARS]) for k, v in settings.items()]


def _live_run(client, experiment_id: str, train_run: str):
    """The run a Train stage opened for these inputs and that no finished stage has claimed
    (a driver that died or failed left it): the one a restarted stage continues."""
    runs = client.search_runs([experiment_id], f"tags.`allmrec.train_run` = '{train_run}'")
    return next((r for r in runs if "allmrec.key" not in r.data.tags), None)


def open_live_run(config: Config, run_home: str, stage: str, inputs: dict) -> str | None:
    """The MLflow run of a Train stage that starts now, its parameters logged: new, or the one
    an interrupted start of the same stage (same inputs) left. None when tracking is off."""
    if not config.tracking.mlflow_uri:
        return None
    try:
        client = _client(tracking_uri(config))
        experiment_id = _experiment_id(client, config, run_home)
        train_run = run_name(stage, inputs)
        live = _live_run(client, experiment_id, train_run)
        if live is not None:
            client.update_run(live.info.run_id, status="RUNNING")
            return live.info.run_id
        tags = {"allmrec.stage": stage, "allmrec.run": run_home, "allmrec.train_run": train_run}
        run_id = client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
        client.log_batch(run_id, params=_params(inputs))
        return run_id
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - tracking must not stop a stage
        _warn(stage, config, exc, "its epochs are logged when it finishes")
        return None


def fail_live_run(config: Config, run_id: str | None) -> None:
    """Mark a Train stage's run FAILED (its stage raised); a rerun of the stage continues it."""
    if run_id is not None:
        _client(tracking_uri(config)).set_terminated(run_id, status="FAILED")


def log_report(uri: str, run_id: str, metrics: dict) -> None:
    """One report of a Train stage's rank 0, as it comes: at step = the training prompts so far
    (Stage 2, whose one epoch may take hours) or else the epoch."""
    from mlflow.entities import Metric

    step = int(metrics.get("prompts", metrics.get("epoch", 0)))
    now = int(time.time() * 1000)
    skip = {"epoch", "step", "prompts"}
    points = [Metric(k, v, now, step) for k, v in _numbers(metrics).items() if k not in skip]
    if points:
        _client(uri).log_batch(run_id, metrics=points)


def log_stage(config: Config, run_home: str, stage_dir: Path, manifest: dict) -> str | None:
    """Log a finished stage as one MLflow run, once: a stage output already logged (the same
    inputs and manifest) keeps its run; the run a Train stage opened is completed. Its run
    id; None when tracking is off."""
    if not config.tracking.mlflow_uri:
        return None
    from mlflow.entities import Metric, RunTag

    name = manifest["stage"]
    inputs = manifest.get("inputs") or stage_inputs(name, config, stage_dir.parent)
    key = f"{run_name(name, inputs)}@{manifest.get('created_at')}"
    client = _client(tracking_uri(config))
    experiment_id = _experiment_id(client, config, run_home)
    logged = client.search_runs([experiment_id], f"tags.`allmrec.key` = '{key}'", max_results=1)
    if logged:
        return logged[0].info.run_id
    tags = {"allmrec.stage": name, "allmrec.run": run_home, "allmrec.key": key}
    tags |= {f"allmrec.output.{f.name}": str(f) for f in sorted(Path(stage_dir).iterdir())}
    live = _live_run(client, experiment_id, run_name(name, inputs))
    if live is not None:  # its parameters and per-report series are there already
        run_id = live.info.run_id
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    try:
        params = [] if live is not None else _params(inputs)
        now = int(time.time() * 1000)
        series = _series(Path(stage_dir))
        if live is not None:  # its reports are there; the curve by prompts is whole at the end
            series = [point for point in series if point[0].startswith("curve/")]
        metrics = [Metric(k, v, now, step) for k, v, step in series]
        final = manifest.get("metrics") or {}
        if name == "eval":  # every section's table and paired differences
            final = {k: manifest.get(k, {}) for k in ("tables", "differences")}
        metrics += [Metric(f"final/{k}", v, now, 0) for k, v in _numbers(final).items()]
        client.log_batch(run_id, metrics=metrics, params=params)  # MLflow splits the batches
        for path in sorted(Path(stage_dir).iterdir()):
            if path.suffix == ".png" or path.name in _SMALL_ARTIFACTS:
                client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def track_stage(config: Config, run_home: str, stage_dir: Path, manifest: dict) -> str | None:
    """`log_stage`, where a tracking store that fails (a server down, a full disk) costs a
    warning and not the stage: its output is kept, and the next run of the chain, which finds
    the stage current, logs it then. MLflow missing is the config's error and still raises."""
    try:
        return log_stage(config, run_home, stage_dir, manifest)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracking failure: warn, keep going
        _warn(
            manifest.get("stage"),
            config,
            exc,
            "its output is kept, and the next run of the chain logs it",
        )
        return None


def _warn(stage: str | None, config: Config, exc: Exception, consequence: str) -> None:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    log.warning(
        "%s: not logged to MLflow at %s (%s: %s); %s",
        stage,
        config.tracking.mlflow_uri,
        type(exc).__name__,
        first,
        consequence,
    )
