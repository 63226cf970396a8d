"""The whole chain, stage after stage, skipping a stage whose outputs are current
(`allmrec.stages.is_current`: made from the very config settings and upstream outputs that
are there now)."""

from __future__ import annotations

import logging
from pathlib import Path

from allmrec.config import Config
from allmrec.stages import STAGES, is_current, read_finished
from allmrec.storage import RunStorage, open_run
from allmrec.tracking import require_mlflow, track_stage

log = logging.getLogger(__name__)


def run_pipeline(
    config: Config,
    run_dir: str | Path | RunStorage,
    stages: tuple[str, ...] = tuple(STAGES),
    force: bool = False,
) -> dict[str, dict]:
    """Run `stages` in order on one Ray; returns each stage's manifest. The run's finished
    stages are pulled from its storage first: what is current there is not redone."""
    from allmrec.distributed.data_pipeline import prepare_data
    from allmrec.distributed.evaluate import evaluate_stack
    from allmrec.distributed.runtime import init_ray
    from allmrec.distributed.train_cf import train_cf
    from allmrec.distributed.train_stage1 import train_stage1
    from allmrec.distributed.train_stage2 import train_stage2

    runners = {
        "data": prepare_data,
        "cf": train_cf,
        "stage1": train_stage1,
        "stage2": train_stage2,
        "eval": evaluate_stack,
    }
    if config.tracking.mlflow_uri:
        require_mlflow()  # before hours of training, not after
    init_ray(config.ray)
    run = open_run(run_dir)
    run_dir = run.pull(*STAGES)
    manifests = {}
    for stage in stages:
        if not force and is_current(stage, config, run_dir):
            log.info("%s: up to date in %s, skipped", stage, run_dir / stage)
            manifests[stage] = read_finished(run_dir / stage)
        else:
            log.info("%s: running", stage)
            manifests[stage] = runners[stage](config, run)
        tracked = track_stage(config, run.home, run_dir / stage, manifests[stage])
        if tracked:
            log.info("%s: logged to MLflow run %s (%s)", stage, tracked, config.tracking.mlflow_uri)
    return manifests
