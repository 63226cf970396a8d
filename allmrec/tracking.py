"""Experiment tracking with MLflow (optional: `pip install 'allmrec[tracking]'`).

With `tracking.mlflow_uri` set, every stage of the chain is logged when it finishes (a stage
skipped as current, the first time it is seen) as one MLflow run named after the stage, under
one experiment per run directory: its declared config settings and seed as parameters, its
per-epoch history (Stage 2's learning curve by training prompts) as metric series, its final
metrics, and where its outputs are (tags; the small plots and the manifest as artifacts).
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


def log_stage(config: Config, run_home: str, stage_dir: Path, manifest: dict) -> str | None:
    """Log a finished stage as one MLflow run, once: a stage output already logged (the same
    inputs and manifest) keeps its run. Its run id; None when tracking is off."""
    if not config.tracking.mlflow_uri:
        return None
    mlflow = require_mlflow()
    from mlflow.entities import Metric, Param

    name = manifest["stage"]
    inputs = manifest.get("inputs") or stage_inputs(name, config, stage_dir.parent)
    key = f"{run_name(name, inputs)}@{manifest.get('created_at')}"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    experiment = experiment_name(config, run_home)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    logged = client.search_runs([experiment_id], f"tags.`allmrec.key` = '{key}'", max_results=1)
    if logged:
        return logged[0].info.run_id
    tags = {"allmrec.stage": name, "allmrec.run": run_home, "allmrec.key": key}
    tags |= {f"allmrec.output.{f.name}": str(f) for f in sorted(Path(stage_dir).iterdir())}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        settings = flatten(inputs["settings"]) | {"seed": inputs["seed"]}
        settings |= {f"upstream.{k}": v for k, v in inputs["upstream"].items()}
        params = [Param(k, json.dumps(v)[:_MAX_PARAM_CHARS]) for k, v in settings.items()]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in _series(Path(stage_dir))]
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
        log.warning(
            "%s: not logged to MLflow at %s (%s: %s); its output is kept, and the next run of "
            "the chain logs it",
            manifest.get("stage"),
            config.tracking.mlflow_uri,
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        return None
