"""The whole chain, stage after stage, skipping a stage whose outputs are current.

A stage is current when its manifest exists, it was made with the same config section (and
seed), and from the very inputs now on disk (the data fingerprint, the CF model's hash).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from allmrec.config import Config, config_to_dict
from allmrec.manifest import MANIFEST, file_sha256
from allmrec.storage import RunStorage, open_run

log = logging.getLogger(__name__)
STAGES = ("data", "cf", "stage1", "stage2", "eval")


def _manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stage_is_current(stage: str, config: Config, run_dir: Path) -> bool:
    settings = config_to_dict(config)
    mine = _manifest(run_dir / stage)
    if mine is None or mine.get("stage") != stage:
        return False
    recorded = mine.get("config", {})
    if recorded.get("seed") != settings["seed"]:
        return False
    if stage == "data":
        return recorded.get("data") == settings["data"]
    data = _manifest(run_dir / "data")
    if data is None or mine.get("data_fingerprint") != data.get("fingerprint"):
        return False
    if stage == "cf":
        return recorded.get("cf") == settings["cf"]
    if stage == "stage1":
        cf_model = run_dir / "cf" / "model.safetensors"
        return (
            recorded.get("stage1") == settings["stage1"]
            and recorded.get("data", {}).get("text_encoder") == settings["data"]["text_encoder"]
            and cf_model.is_file()
            and mine.get("cf_model_sha256") == file_sha256(cf_model)
        )
    if stage == "stage2":
        from allmrec.training.stage2 import stage1_sha256

        joint = run_dir / "stage1" / "joint_item_emb.parquet"
        return (
            recorded.get("stage2") == settings["stage2"]
            and recorded.get("data", {}).get("domain") == settings["data"]["domain"]
            and joint.is_file()
            and mine.get("stage1_sha256") == stage1_sha256(run_dir)
        )
    if stage == "eval":
        projectors = run_dir / "stage2" / "projectors.safetensors"
        return (
            recorded.get("evaluate") == settings["evaluate"]
            and projectors.is_file()
            and mine.get("projectors_sha256") == file_sha256(projectors)
        )
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def run_pipeline(
    config: Config,
    run_dir: str | Path | RunStorage,
    stages: tuple[str, ...] = STAGES,
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
    init_ray(config.ray)
    run = open_run(run_dir)
    run_dir = run.pull(*STAGES)
    manifests = {}
    for stage in stages:
        if not force and stage_is_current(stage, config, run_dir):
            log.info("%s: up to date in %s, skipped", stage, run_dir / stage)
            manifests[stage] = _manifest(run_dir / stage)
            continue
        log.info("%s: running", stage)
        manifests[stage] = runners[stage](config, run)
    return manifests
