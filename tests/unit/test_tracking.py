"""MLflow tracking of a finished stage, into a real local file store, read back with MLflow's
own client."""

import json
import sys
from pathlib import Path

import mlflow  # allmrec[tracking], part of the dev extra
import pytest

from allmrec.config import ConfigError, load_config
from allmrec.manifest import write_manifest
from allmrec.stages import stage_inputs
from allmrec.tracking import experiment_name, log_stage


@pytest.fixture(autouse=True)
def _file_store_allowed(monkeypatch):
    # what tracking_uri sets for a file store; here for the test's own client too
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _finished_cf(run_dir: Path, config) -> tuple[Path, dict]:
    """A CF stage as train_cf writes it: history, a plot, the model file and the manifest."""
    out = run_dir / "cf"
    out.mkdir(parents=True)
    history = [
        {"epoch": 5, "loss": 0.9, "valid_hr@10": 0.31},
        {"epoch": 10, "loss": 0.7, "valid_hr@10": 0.42},
    ]
    (out / "history.json").write_text(json.dumps({"history": history}))
    (out / "curves.png").write_bytes(b"\x89PNG not really")
    (out / "model.safetensors").write_bytes(b"weights")
    manifest = write_manifest(
        out,
        "cf",
        inputs=stage_inputs("cf", config, run_dir),
        metrics={"model": {"test_19neg_hit@1": 0.44}, "popularity": {"test_19neg_hit@1": 0.21}},
    )
    return out, manifest


def test_a_stage_is_one_mlflow_run_with_its_settings_curves_and_outputs(tmp_path: Path):
    store = tmp_path / "mlruns"
    config = load_config(overrides=[f"tracking.mlflow_uri={store}", "cf.lr=0.002"])
    stage_dir, manifest = _finished_cf(tmp_path / "run", config)

    run_id = log_stage(config, str(tmp_path / "run"), stage_dir, manifest)

    client = mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name(experiment_name(config, str(tmp_path / "run")))
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.run_name == "cf"
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["cf.lr"]) == 0.002
    assert json.loads(run.data.params["seed"]) == 42
    assert run.data.params["upstream.data"] == "null"  # no data stage in this run directory
    history = client.get_metric_history(run_id, "valid_hr_at_10")
    assert [(m.step, m.value) for m in history] == [(5, 0.31), (10, 0.42)]
    assert run.data.metrics["final/model.test_19neg_hit_at_1"] == pytest.approx(0.44)
    assert run.data.tags["allmrec.output.model.safetensors"] == str(stage_dir / "model.safetensors")
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "history.json", "manifest.json"} <= logged
    assert "model.safetensors" not in logged  # outputs are named, not copied
    # the same stage output seen again (a later chain that skipped it as current): one run
    assert log_stage(config, str(tmp_path / "run"), stage_dir, manifest) == run_id
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_train_stage_logs_its_reports_live_and_its_end_completes_the_same_run(tmp_path):
    from allmrec.tracking import fail_live_run, log_report, open_live_run, tracking_uri

    store = tmp_path / "mlruns"
    config = load_config(overrides=[f"tracking.mlflow_uri={store}"])
    home = str(tmp_path / "run")
    inputs = stage_inputs("cf", config, tmp_path / "run")
    run_id = open_live_run(config, home, "cf", inputs)
    client = mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())
    log_report(tracking_uri(config), run_id, {"epoch": 5, "loss": 0.9, "valid_hr@10": 0.31})
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and json.loads(run.data.params["seed"]) == 42
    assert [m.value for m in client.get_metric_history(run_id, "valid_hr_at_10")] == [0.31]
    # The stage fails, and its rerun (same inputs) continues the same MLflow run.
    fail_live_run(config, run_id)
    assert client.get_run(run_id).info.status == "FAILED"
    assert open_live_run(config, home, "cf", inputs) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    log_report(tracking_uri(config), run_id, {"epoch": 10, "loss": 0.7, "valid_hr@10": 0.42})
    # It finishes: the end of the stage completes that run, without repeating the series.
    stage_dir, manifest = _finished_cf(tmp_path / "run", config)
    assert log_stage(config, home, stage_dir, manifest) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "valid_hr_at_10")
    assert [(m.step, m.value) for m in history] == [(5, 0.31), (10, 0.42)]
    assert run.data.metrics["final/model.test_19neg_hit_at_1"] == pytest.approx(0.44)
    assert "allmrec.output.model.safetensors" in run.data.tags
    # A later stage with other inputs opens a run of its own.
    other = load_config(overrides=[f"tracking.mlflow_uri={store}", "cf.lr=0.01"])
    assert open_live_run(other, home, "cf", stage_inputs("cf", other, tmp_path / "x")) != run_id


def test_two_runs_of_a_stage_sit_side_by_side_in_one_experiment(tmp_path: Path):
    store = tmp_path / "mlruns"
    for lr in ("0.001", "0.002"):
        config = load_config(overrides=[f"tracking.mlflow_uri={store}", f"cf.lr={lr}"])
        run_dir = tmp_path / f"run-{lr}"
        stage_dir, manifest = _finished_cf(run_dir, config)
        log_stage(config, "shared", stage_dir, manifest)
    client = mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("allmrec:shared")
    runs = client.search_runs([experiment.experiment_id], order_by=["params.`cf.lr`"])
    assert [json.loads(r.data.params["cf.lr"]) for r in runs] == [0.001, 0.002]


def test_tracking_off_logs_nothing(tmp_path: Path):
    config = load_config()
    stage_dir, manifest = _finished_cf(tmp_path / "run", config)
    assert log_stage(config, str(tmp_path / "run"), stage_dir, manifest) is None
    assert not any(tmp_path.rglob("meta.yaml"))


def test_tracking_without_mlflow_installed_says_how_to_install_it(tmp_path, monkeypatch):
    config = load_config(overrides=[f"tracking.mlflow_uri={tmp_path / 'mlruns'}"])
    stage_dir, manifest = _finished_cf(tmp_path / "run", config)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'allmrec\[tracking\]'"):
        log_stage(config, str(tmp_path / "run"), stage_dir, manifest)


def test_a_failing_tracking_store_warns_and_the_next_run_logs_the_stage(tmp_path, caplog):
    from allmrec.tracking import track_stage

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store's directory should be")
    config = load_config(overrides=[f"tracking.mlflow_uri={blocked}"])
    stage_dir, manifest = _finished_cf(tmp_path / "run", config)
    with caplog.at_level("WARNING", logger="allmrec.tracking"):
        assert track_stage(config, str(tmp_path / "run"), stage_dir, manifest) is None
    assert "cf: not logged to MLflow" in caplog.text and "its output is kept" in caplog.text
    assert (stage_dir / "model.safetensors").is_file()
    # The store is back (here: another one): the same finished stage is logged then.
    config = load_config(overrides=[f"tracking.mlflow_uri={tmp_path / 'mlruns'}"])
    run_id = track_stage(config, str(tmp_path / "run"), stage_dir, manifest)
    assert mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_run(run_id)
