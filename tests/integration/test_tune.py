"""Ray Tune over Stage 1's alpha and beta on real MovieLens-100K: an interrupted search
resumes without repeating the trials that finished, ASHA stops a trial early (by its own
record), a Stage 1 run from best.yaml trains with its alpha and beta, and a search that
cannot run is refused before it starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from allmrec.config import load_config

SEARCH = [
    "stage1.epochs=4",
    "stage1.eval_users=100",
    "stage1.zero_stage=0",
    "stage1.checkpoint_every=2",
    # With a reduction factor of 3 only the top third of a rung goes on. The trials start two
    # at a time in grid order; alpha=0.5 trails alpha=0 at the first rung (NDCG@10 0.517
    # against 0.527 here). The kill comes after the first two trials ended (alpha=0 and 0.5,
    # beta=0), so the last alpha=0.5 trial meets their rungs after the resume (RecordingASHA
    # puts them back) and is cut
    "tune.metric=valid_ndcg@10",
    "tune.grace_period=1",
    "tune.reduction_factor=3",
    "tune.alpha=[0.0, 0.5]",
    "tune.beta=[0.0, 0.2]",
]


def _copy(cf_run, target: Path) -> Path:
    shutil.copytree(cf_run, target, ignore=shutil.ignore_patterns("checkpoints", "stage1"))
    return target


def _finished_trials(experiment: Path) -> dict[str, bytes]:
    """result.json of every trial that reported done."""
    finished = {}
    for result in experiment.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("done"):
            finished[result.parent.name] = result.read_bytes()
    return finished


def _search_until_two_trials_end(run_dir: Path, tracking: list[str]) -> dict[str, bytes]:
    """Start the search in a driver process with a local Ray of its own, wait until the first
    two trials (run side by side) have ended, then SIGKILL the driver and its Ray: an
    interrupted search, whose last two trials have just started (the resumed search runs them
    side by side: one round of trials, where a kill at the first end left two).

    Not a job on the session's Ray: there, a Ray Train controller of the killed driver's
    trials outlived the dead job (seen in a whole `make test` here, and the likely cause of a
    CI run's failure), retrying its worker group for minutes while holding CPUs that the
    resumed search needs."""
    args = [sys.executable, "-m", "allmrec.cli", "tune", "--config", "configs/ml-100k-cpu.yaml"]
    for o in [*SEARCH, *tracking, "ray.num_cpus=2"]:
        args += ["--set", o]
    log = run_dir.with_name("driver.log")  # what the driver printed, for a failure's message
    with log.open("wb") as out:
        driver = subprocess.Popen(
            [*args, "--run-dir", str(run_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own local Ray: killed with it
            # Tune saves the search's state at most this often ("auto": 10 s and more): a kill
            # just after a trial ended would otherwise find it still running in the state
            env={**os.environ, "RAY_ADDRESS": "", "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        )
    experiment = run_dir / "tune" / "alpha-beta"
    try:
        deadline = time.monotonic() + 600
        while len(_finished_trials(experiment)) < 2 and time.monotonic() < deadline:
            assert driver.poll() is None, f"the search ended early:\n{_tail(log)}"
            time.sleep(1)
        time.sleep(2)  # a state saved after the second trial ended
        finished = _finished_trials(experiment)
        assert len(finished) >= 2, f"two trials did not end in 10 minutes:\n{_tail(log)}"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    return finished


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


@pytest.mark.slow
def test_a_killed_search_resumes_stops_trials_early_and_feeds_stage1(cf_run, tmp_path, monkeypatch):
    """One search, interrupted and resumed: the finished trials are not run again, ASHA stops
    a trial early, best.yaml feeds the next Stage 1 run, and every trial is in MLflow."""
    import mlflow

    from allmrec.distributed.tune_alpha_beta import search_alpha_beta

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client
    tracking = [f"tracking.mlflow_uri={tmp_path / 'mlruns'}", "tracking.experiment=search"]
    run_dir = _copy(cf_run, tmp_path / "run")
    finished = _search_until_two_trials_end(run_dir, tracking)
    assert len(finished) < 4, _tail(run_dir.with_name("driver.log"))

    config = load_config(["configs/ml-100k-cpu.yaml"], SEARCH + tracking)
    summary = search_alpha_beta(config, run_dir, resume=True)
    after = _finished_trials(run_dir / "tune" / "alpha-beta")
    for trial, content in finished.items():
        assert after[trial] == content, f"{trial} ran again"

    rows = summary["trials"]
    assert len(rows) == 4
    assert all(r["status"] == "done" and r["metric"] is not None for r in rows), rows
    # The scheduler's own decisions (it writes each cut down): at least one trial cut, each
    # cut trial ran no epoch after its cut, and every trial not cut ran all 4 epochs; the
    # trials the killed driver had started (and left unfinished) ran after the resume.
    from allmrec.distributed.tune_alpha_beta import read_rungs, read_stopped

    cuts = read_stopped(run_dir / "tune")
    rungs = read_rungs(run_dir / "tune")  # what ASHA compared, across the kill
    assert len(rungs) == 4 and all(1 in r for r in rungs.values()), rungs
    for trial, at in cuts.items():  # each cut was below another trial at its rung
        assert rungs[trial][at] < max(r[at] for r in rungs.values() if at in r), (trial, rungs)
    # ... and one at least came after the resume, below the rungs of trials that had ended
    # before the kill (which RecordingASHA put back; tests/unit/test_tune_scheduler.py)
    before = {json.loads(c.splitlines()[-1])["trial_id"] for c in finished.values()}
    after_resume = {trial: at for trial, at in cuts.items() if trial not in before}
    assert after_resume, (cuts, before)
    for trial, at in after_resume.items():
        earlier = [rungs[t][at] for t in before if at in rungs[t]]
        assert earlier and rungs[trial][at] < max(earlier), (trial, rungs)
    assert cuts and sum(r["stopped_early"] for r in rows) == len(cuts), (cuts, rows)
    assert sorted(r["epochs"] for r in rows if r["stopped_early"]) == sorted(cuts.values())
    assert all(r["epochs"] == 4 for r in rows if not r["stopped_early"]), rows
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("search/tune")
    logged = client.search_runs([experiment.experiment_id])
    # one MLflow run per trial, the killed driver's and the resumed one's, with its curve
    assert len({r.info.run_name for r in logged}) == 4, [r.info.run_name for r in logged]
    assert any(len(client.get_metric_history(r.info.run_id, "valid_ndcg_at_10")) for r in logged)
    out = run_dir / "tune"
    assert (out / "results.csv").read_text().count("\n") == 5
    assert "| alpha | beta |" in (out / "results.md").read_text()
    assert (out / "alpha_beta.png").stat().st_size > 1000
    best = summary["best"]
    assert best["metric"] == max(r["metric"] for r in rows)

    # The overlay sets the next Stage 1 run's alpha and beta (every Stage 1 run takes its
    # weights from this config object and records it in its manifest).
    base = load_config(["configs/ml-100k-cpu.yaml"])
    overlaid = load_config(["configs/ml-100k-cpu.yaml", out / "best.yaml"])
    assert (overlaid.stage1.alpha, overlaid.stage1.beta) == (best["alpha"], best["beta"])
    assert (base.stage1.alpha, base.stage1.beta) == (0.5, 0.2)
    assert overlaid.stage1.model_dump(exclude={"alpha", "beta"}) == base.stage1.model_dump(
        exclude={"alpha", "beta"}
    )
    # ... and a Stage 1 run from it trains with them (one short epoch here).
    from allmrec.distributed.train_stage1 import train_stage1

    manifest = train_stage1(
        load_config(
            ["configs/ml-100k-cpu.yaml", out / "best.yaml"],
            ["stage1.epochs=1", "stage1.eval_every=1", "stage1.checkpoint_every=1"],
        ),
        run_dir,
    )
    trained = manifest["inputs"]["settings"]["stage1"]
    assert (trained["alpha"], trained["beta"]) == (best["alpha"], best["beta"])
    assert (run_dir / "stage1" / "joint_item_emb.parquet").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.alpha=[]", "tune.alpha: an empty grid"),
        ("tune.beta=[-0.1]", "tune.beta"),
        ("tune.metric=loss", "tune.metric"),
        ("tune.grace_period=99", "tune.grace_period"),
    ],
)
def test_a_bad_search_is_refused_before_it_starts(override, message, tmp_path):
    from allmrec.distributed.tune_alpha_beta import search_alpha_beta

    with pytest.raises(ValueError, match=message):
        search_alpha_beta(load_config(["configs/ml-100k-cpu.yaml"], [override]), tmp_path)


def test_a_bad_random_range_is_refused(tmp_path):
    from allmrec.distributed.tune_alpha_beta import search_alpha_beta

    config = load_config(
        ["configs/ml-100k-cpu.yaml"], ["tune.search=random", "tune.alpha_range=[0.0, 1.0]"]
    )
    with pytest.raises(ValueError, match="log-uniform range needs low > 0"):
        search_alpha_beta(config, tmp_path)
