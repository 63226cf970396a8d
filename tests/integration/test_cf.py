"""CF pre-training: every backbone learns on real MovieLens-100K; Ray Train runs, resumes,
repeats itself with the same seed; bad inputs are refused clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from allmrec.config import load_config
from allmrec.data.prepared import load_prepared
from allmrec.evaluation import SASREC_PROTOCOL, evaluate, model_scorer, popularity_scorer
from allmrec.manifest import ArtifactError
from allmrec.training.cf import build_cf_model, load_cf_model, train_epoch, user_rows

# Epochs and learning rate per backbone for a quick learning check (SASRec's dropout of 0.5
# makes it the slowest starter; the paper's 200 epochs are for the real run).
# Measured here (valid HR@10, popularity 0.394): sasrec 0.53 after 15 epochs (0.44 after 12),
# gru4rec 0.46 after 15, nextitnet 0.49 after 12, ncf 0.46 after 20.
QUICK = {"sasrec": (15, 2e-3), "gru4rec": (15, 3e-3), "nextitnet": (12, 2e-3), "ncf": (20, 2e-3)}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(QUICK))
def test_every_backbone_beats_popularity(ml100k_prepared, backbone):
    run_dir, _ = ml100k_prepared
    data = load_prepared(run_dir)
    epochs, lr = QUICK[backbone]
    config = load_config(["configs/ml-100k-cpu.yaml"], [f"cf.backbone={backbone}"])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_cf_model(config.cf, data.num_users, data.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    users = np.arange(1, data.num_users + 1)
    rows = user_rows(users, [data.train[u] for u in users])
    for epoch in range(epochs):
        train_epoch(
            model,
            optimizer,
            rows,
            128,
            config.cf.max_len,
            data.num_items,
            np.random.default_rng(epoch),
        )
    model_hr = evaluate(model_scorer(model), data, "valid", SASREC_PROTOCOL, seed=1)["hit@10"]
    pop_hr = evaluate(popularity_scorer(data), data, "valid", SASREC_PROTOCOL, seed=1)["hit@10"]
    assert model_hr > pop_hr + 0.04, (backbone, model_hr, pop_hr)


@pytest.mark.slow
def test_ray_train_resumes_after_worker_failure_and_repeats(
    ml100k_prepared, cf_run, cf_settings, tmp_path, monkeypatch
):
    """The session's SASRec (`cf_run`: 8 epochs, validated every 2) again, with a worker
    failing at the start of epoch 5 and MLflow tracking on: it resumes from epoch 4, and its
    metrics equal the uninterrupted run's."""
    from allmrec.distributed.train_cf import train_cf

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client
    source, _ = ml100k_prepared
    run_dir = tmp_path / "failed"
    shutil.copytree(source / "data", run_dir / "data")
    store = tmp_path / "mlruns"
    config = load_config(
        ["configs/ml-100k-cpu.yaml"],
        [*cf_settings, "cf.fail_at_epoch=5", f"tracking.mlflow_uri={store}"],
    )
    failed = train_cf(config, run_dir)
    # The worker raised at the start of epoch 5, Ray Train restarted it, and it resumed from
    # the epoch-4 checkpoint instead of starting over.
    assert failed["resumed_from_epochs"] == [4]
    assert failed["epochs_run"] == 8
    history = json.loads((run_dir / "cf" / "history.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, 9))
    # The weights are those of the checkpoint Ray scored best by validation NDCG@10.
    scored = {row["epoch"]: row["valid_ndcg@10"] for row in history if "valid_ndcg@10" in row}
    assert list(scored) == [2, 4, 6, 8] and failed["best_epoch"] == max(scored, key=scored.get)
    # ... and the model written is that epoch's: its validation NDCG@10, scored again on the
    # same seeded candidates, is the one the history holds for the best epoch.
    best_ndcg = failed["metrics"]["model"]["valid_100neg_ndcg@10"]
    assert best_ndcg == pytest.approx(scored[failed["best_epoch"]], abs=1e-3)
    # MLflow got every report as it came, through the failure and the resume, into the
    # stage's one run, which the end of the stage (here called as the chain calls it) closes.
    import mlflow

    from allmrec.tracking import experiment_name, track_stage

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name(experiment_name(config, str(run_dir)))
    [live] = client.search_runs([experiment.experiment_id])
    assert live.info.status == "RUNNING"
    ndcg = client.get_metric_history(live.info.run_id, "valid_ndcg_at_10")
    assert sorted({m.step for m in ndcg}) == [2, 4, 6, 8]
    assert {m.step for m in client.get_metric_history(live.info.run_id, "loss")} == set(range(1, 9))
    tracked = track_stage(config, str(run_dir), run_dir / "cf", failed)
    assert tracked == live.info.run_id
    assert client.get_run(tracked).info.status == "FINISHED"
    assert (run_dir / "cf" / "model.safetensors").is_file()
    assert (run_dir / "cf" / "curves.png").stat().st_size > 1000

    # The session's uninterrupted run: same seed, same data, same candidates, the same
    # metrics, failure or not.
    clean = json.loads((cf_run / "cf" / "manifest.json").read_text())
    assert clean["resumed_from_epochs"] == []
    assert clean["metrics"] == failed["metrics"]
    assert clean["metrics"]["model"]["valid_100neg_hit@10"] > 0.2
    model, manifest = load_cf_model(cf_run, load_prepared(cf_run))
    assert manifest["backbone"]["name"] == "sasrec"
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_data_is_a_clear_error(tmp_path):
    from allmrec.distributed.train_cf import train_cf

    with pytest.raises(ArtifactError, match=r"data/manifest.json: missing.*allmrec data prepare"):
        train_cf(load_config([]), tmp_path)


@pytest.mark.slow
def test_mismatched_artifacts_are_refused(ml100k_prepared, tmp_path):
    source, _ = ml100k_prepared
    run_dir = tmp_path / "run"
    shutil.copytree(source / "data", run_dir / "data")
    manifest_path = run_dir / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stage"] = "cf"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="field 'stage' is 'cf', expected 'data'"):
        load_prepared(run_dir)

    manifest["stage"] = "data"
    manifest_path.write_text(json.dumps(manifest))
    data = load_prepared(run_dir)
    (run_dir / "cf").mkdir()
    (run_dir / "cf" / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 2,
                "stage": "cf",
                "inputs": {"upstream": {"data": "0" * 64}},
                "backbone": {"name": "sasrec", "config": {}},
            }
        )
    )
    with pytest.raises(ArtifactError, match="inputs.upstream.data"):
        load_cf_model(run_dir, data)
