"""The cluster path: the YAMLs under cluster/ are valid, and a real two-node Ray cluster
started by cluster/local.sh runs the pipeline as a submitted Ray Job, with the run's storage
a URI that the nodes share and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
IMAGE_HOME = "/home/ray/allmrec"  # where cluster/Dockerfile puts the repository


def _yaml_files() -> list[Path]:
    return sorted((REPO / "cluster").rglob("*.yaml"))


def test_every_cluster_yaml_parses():
    files = _yaml_files()
    assert {f.parent.name for f in files} >= {"launcher", "kuberay"}
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


# ---- Ray cluster launcher --------------------------------------------------------------


def _launcher_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_launcher_yaml_is_a_valid_autoscaling_gpu_cluster(cloud):
    import jsonschema

    config = yaml.safe_load((REPO / "cluster" / "launcher" / f"{cloud}.yaml").read_text())
    schema = _launcher_schema()
    jsonschema.validate(config, schema)  # Ray's own schema of `ray up` files
    with pytest.raises(jsonschema.ValidationError):  # and the schema does bite
        jsonschema.validate({**config, "max_worker": 3}, schema)

    assert config["provider"]["type"] == cloud
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = types["gpu_workers"]
    assert gpu["max_workers"] > gpu["min_workers"] == 0  # autoscales from zero
    machine = gpu["node_config"].get("InstanceType") or gpu["node_config"]["machineType"]
    assert machine.startswith(("g", "p", "a2", "a3")), machine  # GPU instance families
    assert "resources" in head

    setup = "\n".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -q -e ." in setup
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start  # the job server is not public
    assert all("RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"]) for _ in [0])
    assert any(dst.endswith(".ray/auth_token") for dst in config["file_mounts"])


# ---- KubeRay ---------------------------------------------------------------------------


def _kuberay() -> dict[str, dict]:
    docs = {}
    for path in sorted((REPO / "cluster" / "kuberay").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        docs[doc["kind"]] = doc
    return docs


def _cluster_spec(doc: dict) -> dict:
    return {
        "RayCluster": lambda d: d["spec"],
        "RayJob": lambda d: d["spec"]["rayClusterSpec"],
        "RayService": lambda d: d["spec"]["rayClusterConfig"],
    }[doc["kind"]](doc)


def test_kuberay_manifests_carry_their_required_fields():
    docs = _kuberay()
    assert set(docs) == {"RayCluster", "RayJob", "RayService"}
    for kind, doc in docs.items():
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, kind
        assert spec["authOptions"]["mode"] == "token", kind  # needs rayVersion >= 2.52
        head = spec["headGroupSpec"]
        assert "rayStartParams" in head
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", kind  # not on the internet
        assert head["template"]["spec"]["containers"][0]["image"], kind
        groups = spec["workerGroupSpecs"]
        gpu_groups = []
        for group in groups:
            assert group["groupName"] and "rayStartParams" in group
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            container = group["template"]["spec"]["containers"][0]
            assert container["image"]
            if "gpu" in group["groupName"]:
                gpu_groups.append(group)
                assert container["resources"]["limits"]["nvidia.com/gpu"], kind
        assert gpu_groups and any(g["groupName"] == "cpu" for g in groups), kind


def test_rayjob_runs_the_pipeline_to_a_bucket():
    job = _kuberay()["RayJob"]["spec"]
    words = job["entrypoint"].split()
    script = Path(words[1].replace(IMAGE_HOME, str(REPO)))
    config = Path(words[words.index("--config") + 1].replace(IMAGE_HOME, str(REPO)))
    assert script == REPO / "jobs" / "pipeline.py" and script.is_file()
    assert config.is_file()
    storage = words[words.index("--set") + 1]
    assert storage.startswith("storage=s3://")  # pod disks do not outlive the job
    assert job["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_serve_app_config():
    serve = yaml.safe_load(_kuberay()["RayService"]["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve_app" / "config.yaml").read_text())
    app, local_app = serve["applications"][0], local["applications"][0]
    assert app["import_path"] == local_app["import_path"] == "serve_app.app:build_app"
    assert set(app["args"]) == set(local_app["args"])
    assert app["args"]["run_dir"].startswith("s3://")
    assert {d["name"] for d in app["deployments"]} == {d["name"] for d in local_app["deployments"]}
    llm = next(d for d in app["deployments"] if d["name"] == "LLM")
    assert llm["ray_actor_options"]["num_gpus"] == 1


def test_dockerfile_matches_the_pinned_versions():
    text = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in text
    assert "torch==2.13.0" in text and IMAGE_HOME in text


# ---- a real two-node cluster on 127.0.0.1 ---------------------------------------------


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, stage1_run, tiny_llm):
    """cluster/local.sh start ... stop, on ports and a token of the test's own. The session's
    Stage 1 and tiny LLM (the pipeline job's inputs) are made first: the cluster's processes
    would slow their training."""
    base = tmp_path_factory.mktemp("cluster")
    env = {
        **os.environ,
        "RAY_PORT": "6397",
        "DASHBOARD_PORT": "8297",
        "CLUSTER_DIR": str(base / "state"),
        "WORKER_CACHE": str(base / "worker-cache"),
        "RAY_AUTH_TOKEN_PATH": str(base / "token"),
        "OBJECT_STORE_MB": "512",
    }
    env.pop("RAY_ADDRESS", None)
    started = _run(["bash", "cluster/local.sh", "start"], env, timeout=240)
    assert started.returncode == 0, started.stdout + started.stderr
    pids = [int((base / "state" / f"{n}.pid").read_text()) for n in ("head", "worker")]
    client_env = {**env, "RAY_ADDRESS": "http://127.0.0.1:8297", "RAY_AUTH_MODE": "token"}
    try:
        yield base, client_env
    finally:
        stopped = _run(["bash", "cluster/local.sh", "stop"], env, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        for pid in pids:  # exactly the processes it started are gone
            assert not Path(f"/proc/{pid}").exists()
        # ... and every process of its nodes (each holds its logs in the cluster's temp dir)
        assert _holding_files_under("/tmp/allmrec-ray-6397/") == []


def _holding_files_under(prefix: str) -> list[int]:
    holders = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd).startswith(prefix):
                holders.add(int(fd.parts[2]))
        except OSError:
            continue
    return sorted(holders)


def _submit(client_env: dict, submission_id: str, args: list[str], timeout: float):
    """`ray job submit` (waits for the end), then its status and logs as a user reads them."""
    submitted = _run(
        [
            RAY_CLI,
            "job",
            "submit",
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--",
            "python",
            *args,
        ],
        client_env,
        timeout,
    )
    status = _run([RAY_CLI, "job", "status", submission_id], client_env, 60)
    logs = _run([RAY_CLI, "job", "logs", submission_id], client_env, 60).stdout
    return status.stdout + status.stderr + submitted.stderr[-3000:], logs


@pytest.mark.slow
def test_cluster_refuses_a_client_without_its_token(local_cluster):
    base, client_env = local_cluster
    wrong = base / "wrong-token"
    wrong.write_text("not-the-cluster-token")
    refused = _run([RAY_CLI, "job", "list"], {**client_env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, 60)
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stderr or "Authentication" in refused.stderr
    allowed = _run([RAY_CLI, "job", "list"], client_env, 60)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.slow
def test_a_job_with_a_bad_config_fails_with_the_reason_in_its_logs(local_cluster):
    _, client_env = local_cluster
    status, logs = _submit(
        client_env,
        "bad-config",
        ["jobs/train_cf.py", "--config", "configs/ml-100k-cpu.yaml", "--set", "cf.epoch=3"],
        timeout=180,
    )
    assert "Job 'bad-config' failed" in status and "exit code 2" in status, status
    last = logs.strip().splitlines()[-2:]
    assert any("allmrec: error: invalid config" in line for line in last), logs[-2000:]
    assert "unknown key 'cf.epoch'" in logs


@pytest.mark.slow
def test_the_pipeline_as_a_ray_job_on_two_nodes(
    local_cluster, stage1_run, cf_settings, stage1_settings, tiny_llm, monkeypatch
):
    import mlflow

    base, client_env = local_cluster
    run = base / "bucket" / "tiny"
    for stage in ("data", "cf", "stage1"):  # a run in the bucket, as an earlier job left it
        shutil.copytree(stage1_run / stage, run / stage)
    before = {s: (run / s / "manifest.json").read_bytes() for s in ("data", "cf", "stage1")}
    overrides = [
        "name=tiny",
        f"storage=file://{base / 'bucket'}",
        # the session's CF and Stage 1 settings: with them its data, CF and Stage 1 are
        # current for this config, so the pipeline takes them from the storage
        *cf_settings,
        *stage1_settings,
        f"stage2.llm={tiny_llm}",
        "stage2.readout_layer=null",  # the config's layer 10 is deeper than the tiny LLM
        "stage2.max_train_users=4",
        "stage2.zero_stage=3",
        # 1 CPU on the head: ZeRO-3 partitions the LLM over a worker on each node
        "stage2.scaling.num_workers=2",
        "stage2.scaling.cpus_per_worker=1",
        "evaluate.max_users=4",
        "evaluate.num_workers=2",
        "evaluate.cpus_per_worker=1",
        f"tracking.mlflow_uri={base / 'mlruns'}",
    ]
    args = ["jobs/pipeline.py", "--config", "configs/ml-100k-cpu.yaml"]
    for override in overrides:
        args += ["--set", override]
    status, logs = _submit(client_env, "pipeline", args, timeout=900)
    assert "Job 'pipeline' succeeded" in status, status + logs[-3000:]
    assert "| A-LLMRec (rank) |" in logs  # the results table, printed by the job

    for stage in ("data", "cf", "stage1"):  # current: taken as they were
        assert (run / stage / "manifest.json").read_bytes() == before[stage], stage
    stage2 = json.loads((run / "stage2" / "manifest.json").read_text())
    assert stage2["workers"] == 2 and stage2["zero_stage"] == 3
    # every rank (one per node) holds half of the frozen LLM
    shares = [stage2["metrics"][f"llm_param_share_rank{r}"] for r in (0, 1)]
    assert shares == pytest.approx([0.5, 0.5], abs=0.02)
    assert (run / "stage2" / "projectors.safetensors").is_file()
    assert json.loads((run / "eval" / "manifest.json").read_text())["users"] == 4
    assert (run / "eval" / "results.md").is_file()
    assert any((run / "checkpoints").iterdir())  # Ray Train wrote its checkpoints there too
    # The worker node read its inputs from the storage into its own cache, never from the
    # head's disk.
    mirrors = list((base / "worker-cache" / "runs").glob("tiny-*"))
    assert mirrors, "nothing ran on the worker node"
    assert all((mirrors[0] / s / "manifest.json").is_file() for s in ("data", "cf", "stage1"))
    assert not (REPO / "runs" / "tiny").exists()

    # The stages that ran are in MLflow, with their curves and final metrics.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client
    client = mlflow.MlflowClient(tracking_uri=(base / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(f"allmrec:file://{base / 'bucket'}/tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # every stage, the three that were current (skipped, logged the first time seen) too
    assert set(runs) == {"data", "cf", "stage1", "stage2", "eval"}
    assert client.get_metric_history(runs["stage2"].info.run_id, "loss")
    # Stage 2 ran: its run was opened when it started and logged live, then closed at its end.
    assert runs["stage2"].data.tags.get("allmrec.train_run", "").startswith("stage2-")
    assert runs["stage2"].info.status == "FINISHED"
    # The job's log went to the run's home, beside its stages.
    assert list((base / "bucket" / "tiny" / "logs").glob("demo-*.log"))
    assert "final/tables.all users.A-LLMRec _rank_.hit_at_1" in runs["eval"].data.metrics
