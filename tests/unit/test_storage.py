"""The run's storage: a local home is used in place; a URI home is mirrored per node, stage by
stage, manifest last, and nothing is read from another process's local copy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from allmrec.manifest import MANIFEST
from allmrec.stages import read_manifest
from allmrec.storage import RecordLog, RunStorage, StorageError, join


def _stage(directory: Path, marker: str) -> None:
    (directory / "parts").mkdir(parents=True)
    (directory / "parts" / "a.bin").write_bytes(os.urandom(1000))
    (directory / "note.txt").write_text(marker)
    (directory / MANIFEST).write_text(
        json.dumps({"format_version": 2, "stage": "data", "marker": marker})
    )


def test_local_home_is_its_own_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunStorage.open("runs/x")
    assert not run.remote
    assert run.local == tmp_path / "runs" / "x" and run.home == str(run.local)
    assert run.pull("data") == run.local  # nothing to move
    assert join("s3://bucket/root/", "x", "cf") == "s3://bucket/root/x/cf"
    assert join("runs", "x") == "runs/x"


def test_uri_home_push_then_pull_on_another_node(tmp_path, monkeypatch):
    home = f"file://{tmp_path / 'bucket'}/runs/r1"
    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path / "node-a"))
    writer = RunStorage.open(home)
    assert writer.remote and writer.local.is_relative_to(tmp_path / "node-a")
    _stage(writer.local / "data", "first")
    writer.push("data")
    stored = tmp_path / "bucket" / "runs" / "r1" / "data"
    assert (stored / MANIFEST).is_file() and (stored / "parts" / "a.bin").is_file()
    assert writer.has("data") and not writer.has("cf")

    # another node: its own cache, nothing shared but the home
    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path / "node-b"))
    reader = RunStorage.open(home)
    assert reader.local != writer.local
    local = reader.pull("data", "cf")
    assert (local / "data" / "note.txt").read_text() == "first"
    assert (local / "data" / "parts" / "a.bin").read_bytes() == (
        writer.local / "data" / "parts" / "a.bin"
    ).read_bytes()
    assert not (local / "cf").exists()
    read_manifest(local / "data", "data")

    # current copy: not downloaded again; a new version in the home: replaced
    before = (local / "data" / "note.txt").stat().st_mtime_ns
    reader.pull("data")
    assert (local / "data" / "note.txt").stat().st_mtime_ns == before
    shutil.rmtree(writer.local / "data")
    _stage(writer.local / "data", "second")
    writer.push("data")
    reader.pull("data")
    assert (local / "data" / "note.txt").read_text() == "second"

    # removed from the home: the copy goes too (it would be stale)
    shutil.rmtree(stored)
    reader.pull("data")
    assert not (local / "data").exists()


def test_push_replaces_the_stage_and_manifest_marks_it_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path / "cache"))
    run = RunStorage.open(f"file://{tmp_path / 'bucket'}/r")
    _stage(run.local / "cf", "old")
    (run.local / "cf" / "stale.txt").write_text("from an older run")
    run.push("cf")
    (run.local / "cf" / "stale.txt").unlink()
    (run.local / "cf" / MANIFEST).unlink()  # an unfinished stage: its files only
    run.push("cf")
    stored = tmp_path / "bucket" / "r" / "cf"
    assert not (stored / "stale.txt").exists()
    assert not (stored / MANIFEST).exists() and not run.has("cf")


def test_relative_home_inside_a_job_working_dir_is_refused(tmp_path, monkeypatch):
    from allmrec.distributed.job_dir import refuse_relative_home

    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "x"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with pytest.raises(StorageError, match="relative.*absolute path every node mounts"):
        refuse_relative_home("runs/demo")
    refuse_relative_home(str(tmp_path / "shared"))  # absolute: fine
    refuse_relative_home("s3://bucket/runs/demo")  # a URI: fine
    monkeypatch.chdir(tmp_path)
    refuse_relative_home("runs/demo")  # outside a job: a relative path is the user's choice


def test_unknown_protocol_is_a_clear_error(tmp_path):
    from allmrec.storage import filesystem

    with pytest.raises(StorageError, match="nosuchfs://"):
        filesystem("nosuchfs://bucket/x")


@pytest.mark.parametrize("scheme", ["path", "uri"])
def test_record_log_between_replicas(tmp_path, scheme):
    location = str(tmp_path / "log") if scheme == "path" else f"file://{tmp_path / 'log'}"
    first, second = RecordLog(location), RecordLog(location)
    assert second.new_records() == []  # nothing yet, and no directory needed
    assert first.claim("a", {"item_id": "a"}) is None
    assert first.claim("b", {"item_id": "b"}) is None
    assert first.new_records() == []  # its own records are applied already
    assert sorted(r["item_id"] for r in second.new_records()) == ["a", "b"]
    assert second.new_records() == []
    # a key is written once: a second claim gets the record that is there, whoever asks
    assert second.claim("a", {"item_id": "a", "title": "other"}) == {"item_id": "a"}
    assert second.claim("c", {"item_id": "c"}) is None
    assert [r["item_id"] for r in first.new_records()] == ["c"]
    assert sorted(r["item_id"] for r in RecordLog(location).new_records()) == ["a", "b", "c"]


def test_record_log_claims_race_to_one_winner(tmp_path):
    """Sixteen threads claim one key at once (as two replicas' threads would): one wins, every
    other sees the winner's record, and the key holds it alone."""
    from concurrent.futures import ThreadPoolExecutor

    location = str(tmp_path / "log")

    def claim(n: int):
        return RecordLog(location).claim("same", {"writer": n})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(claim, range(16)))
    winners = [n for n, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(r == {"writer": winners[0]} for r in results if r is not None)
    assert RecordLog(location).new_records() == [{"writer": winners[0]}]
    assert len(list((tmp_path / "log").iterdir())) == 1  # no hidden file left behind


def test_a_command_on_a_uri_home_pushes_its_log_there(tmp_path, monkeypatch, capfd):
    """The whole CLI path of a command that ends before Ray starts (tracking asked for,
    MLflow missing: refused before any training): exit 2, one error line, and its log in the
    home's logs/ as well as in this node's copy."""
    import sys

    from allmrec.cli import main

    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path / "node"))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    home = f"file://{tmp_path / 'bucket'}/runs/r1"
    code = main(["train", "cf", "--run-dir", home, "--set", f"tracking.mlflow_uri={tmp_path}"])
    assert code == 2
    err = capfd.readouterr().err
    assert "pip install 'allmrec[tracking]'" in err and "once it ends, file://" in err
    [pushed] = (tmp_path / "bucket" / "runs" / "r1" / "logs").glob("train-cf-*.log")
    assert "tracking.mlflow_uri is set, but MLflow is not installed" in pushed.read_text()
