"""The paper's user scenarios end to end on real MovieLens-100K through Ray: the held-out cold
users reach no stage's training, and a few-shot run's CF model is trained on its K users only
and tested on the others."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from allmrec.config import load_config


def _roles(run_dir) -> dict[str, set[int]]:
    users = pq.read_table(run_dir / "data" / "users.parquet").to_pandas()
    return {role: set(group["user_idx"]) for role, group in users.groupby("role")}


@pytest.mark.slow
def test_held_out_cold_users_are_in_no_stage_s_training_users(stack_run):
    """The session's stack (data, SASRec, Stage 1, Stage 2): each manifest's digest of the
    users its workers trained on is that of users trained on by role, never a cold one."""
    from allmrec.config import Config
    from allmrec.distributed.common import users_sha256
    from allmrec.distributed.train_stage2 import _training_users
    from allmrec.training.stage2 import load_stage2_inputs

    roles = _roles(stack_run)
    assert len(roles["cold"]) == 94 and len(roles["train"]) == 849
    manifests = {
        stage: json.loads((stack_run / stage / "manifest.json").read_text())
        for stage in ("cf", "stage1", "stage2")
    }
    trained = sorted(roles["train"])  # every one of them has 2+ training items
    assert manifests["cf"]["train_users"] == 849
    assert manifests["cf"]["train_users_sha256"] == users_sha256(trained)
    assert manifests["stage1"]["train_users_sha256"] == users_sha256(trained)
    # Stage 2 trains on a seeded 8 of them (conftest STACK_SETTINGS)
    config = Config.model_validate(manifests["stage2"]["config"])
    stage2_users = _training_users(config, load_stage2_inputs(stack_run, config))
    assert len(stage2_users) == 8 and set(stage2_users) <= roles["train"]
    assert manifests["stage2"]["train_users_sha256"] == users_sha256(stage2_users)


@pytest.mark.slow
def test_a_few_shot_run_trains_on_its_k_users_and_tests_the_others(ray_local, tmp_path):
    from allmrec.data.prepared import load_prepared
    from allmrec.distributed.common import users_sha256
    from allmrec.distributed.data_pipeline import prepare_data
    from allmrec.distributed.train_cf import train_cf

    run_dir = tmp_path / "few-shot"
    config = load_config(
        ["configs/ml-100k-cpu.yaml"],
        ["data.few_shot_users=40", "data.cold_user_share=0", "cf.epochs=2", "cf.eval_every=2"],
    )
    prepare_data(config, run_dir)
    roles = _roles(run_dir)
    assert len(roles["train"]) == 40 and len(roles["unseen"]) == 903 and "cold" not in roles
    data = load_prepared(run_dir)
    # items count the K users' training interactions only: the popularity the run may know
    k_items = np.concatenate([data.train[u] for u in sorted(roles["train"])])
    assert np.array_equal(data.item_train_counts, np.bincount(k_items, minlength=1350))
    assert (data.item_train_counts == 0).sum() > 300  # most of the catalogue unseen by K

    manifest = train_cf(config, run_dir)
    assert manifest["train_users"] == 40
    assert manifest["train_users_sha256"] == users_sha256(sorted(roles["train"]))
    # validated within the K (model selection is training), tested on the 903 others
    metrics = manifest["metrics"]["model"]
    assert metrics["valid_19neg_users"] == 40 and metrics["test_19neg_users"] == 903
    assert set(data.eval_users("test")) == roles["unseen"]
