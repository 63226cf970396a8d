"""What every Ray Train stage shares: the driver's steps (`train_stage`), the workers' set-up,
checkpoints and cross-worker sums, and fault injection."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load_file, save_file

from allmrec.config import Config, TrainScaling
from allmrec.console import say
from allmrec.stages import run_name, stage_inputs
from allmrec.tracking import fail_live_run, log_report, open_live_run, tracking_uri
from allmrec.training.zero import import_deepspeed, skip_cpu_shm_op

log = logging.getLogger(__name__)


def quiet_worker_warnings() -> None:
    """torch.distributed warns that DeepSpeed's collectives are deprecated on every call, so
    once per training step and worker: hide those, they drown the progress lines. Ray Train
    logs every `report` of a worker at INFO under a logger named by its file's path, outside
    `ray.train` (so `LoggingConfig` does not reach it): that one follows the same level."""
    warnings.filterwarnings(
        "ignore",
        message=r".*is deprecated\. Please use `torch\.distributed",
        category=FutureWarning,
    )
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its lines stay
        return
    level = os.environ.get("ALLMREC_RAY_TRAIN_LOG_LEVEL", "WARNING")
    logging.getLogger(train_context.__file__).setLevel(level)


def deepspeed_worker(scaling: TrainScaling) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of a DeepSpeed Train worker, its threads and process group
    set up: gloo on CPU, NCCL on GPUs (reusing the group Ray Train made)."""
    import math

    if not scaling.use_gpu:  # said, not detected: DeepSpeed warns on every worker otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import ray.train.torch

    deepspeed = import_deepspeed()
    quiet_worker_warnings()
    if not scaling.use_gpu:
        skip_cpu_shm_op()
    context = ray.train.get_context()
    torch.set_num_threads(max(1, math.ceil(scaling.cpus_per_worker)))
    deepspeed.init_distributed(dist_backend="nccl" if scaling.use_gpu else "gloo")
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def restore_deepspeed(engine) -> dict | None:
    """The `state.json` of the Ray checkpoint this worker resumes from, after loading the
    engine's shard of it; None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as ckpt:
        engine.load_checkpoint(ckpt, tag="deepspeed", load_module_strict=False)
        return json.loads((Path(ckpt) / "state.json").read_text())


def broadcast_from_rank0(module: torch.nn.Module) -> None:
    """Every parameter and buffer of `module` as rank 0 holds it (a no-op on one worker):
    what each worker fitted alone at the start (the item map, the content path, the gate) is
    then one model, even where two accelerators round differently."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = _collective_device()
    for tensor in [*module.parameters(), *module.buffers()]:
        shared = tensor.data.to(device)
        dist.broadcast(shared, src=0)
        tensor.data.copy_(shared)


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all workers (the values themselves on a single worker)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def by_rank(name: str, value: float, rank: int, world: int) -> dict[str, float]:
    """Every worker's `value` as {name_rank0: ..., name_rank1: ...}: a collective, every rank
    calls it (each adds its value at its own place of a zero vector)."""
    values = all_reduce_sum([value if r == rank else 0.0 for r in range(world)])
    return {f"{name}_rank{r}": v for r, v in enumerate(values)}


def maybe_fail(
    fail_at_epoch: int | None,
    epoch: int,
    rank: int,
    marker_dir: str,
    *,
    fail_at_step: int | None = None,
    step: int = 0,
) -> None:
    """Test hook: raise once in a real worker at the start of `fail_at_epoch`, or after its
    step `fail_at_step` (a marker file in the run's storage, seen by the restarted worker on
    any node, makes it once)."""
    from allmrec.storage import create_once, join

    if fail_at_epoch != epoch or rank != 0 or (fail_at_step or 0) != step:
        return
    where = f"epoch-{epoch}" + (f"-step-{step}" if step else "")
    if create_once(join(marker_dir, f"injected-failure-{where}"), "failed here once\n"):
        raise RuntimeError(f"injected failure at {where} (fail_at_epoch/fail_at_step)")


def make_trainer(
    train_loop,
    loop_config: dict,
    scaling: TrainScaling,
    storage: str,
    name: str,
    checkpoints_to_keep: int,
    callbacks: list | None = None,
    best_by: str | None = None,
) -> TorchTrainer:
    """A TorchTrainer as every allmrec job uses it: gloo on CPU, NCCL on GPUs, a resumable run
    `storage/name` (a path or URI: Ray Train persists checkpoints there itself), and
    `scaling.max_failures` worker failures survived from checkpoints. With `best_by` (a
    reported metric, higher is better), Ray keeps the `checkpoints_to_keep` best checkpoints
    by it, and always the latest (the one a restarted worker resumes from)."""
    from allmrec.distributed.runtime import check_fits_locally
    from allmrec.storage import join

    check_fits_locally(
        f"{name.split('-')[0]}.scaling",
        scaling.num_workers,
        scaling.cpus_per_worker,
        int(scaling.use_gpu),
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "marker_dir": join(storage, name)},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=checkpoints_to_keep,
                checkpoint_score_attribute=best_by,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks or [],
            # Ray Train's own INFO lines (every report and checkpoint, twice an epoch) bury
            # the stage's metrics; `-v` (ALLMREC_RAY_TRAIN_LOG_LEVEL=INFO) brings them back.
            logging_config=LoggingConfig(
                log_level=os.environ.get("ALLMREC_RAY_TRAIN_LOG_LEVEL", "WARNING")
            ),
        ),
    )


def save_deepspeed(engine, rank: int, weights: dict, state: dict, metrics: dict, weights_file: str):
    """Report `metrics` to Ray Train with a checkpoint: every rank's DeepSpeed shard of the
    trained parameters and optimizer state, and from rank 0 the gathered `weights` (what the
    stage's output is made from) and `state.json`."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
        if rank == 0:
            save_file(weights, str(Path(tmp) / weights_file))
            (Path(tmp) / "state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class MlflowReports(UserCallback):
    """Every report of a stage's rank 0 into its MLflow run as it comes. Runs on Ray Train's
    controller; a failure to log warns once and never stops the training."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id, self.warned = uri, run_id, False

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        try:
            log_report(self.uri, self.run_id, metrics[0])
        except Exception as exc:  # noqa: BLE001
            if not self.warned:
                log.warning("MLflow run %s: a report was not logged (%r)", self.run_id, exc)
                self.warned = True


@dataclass
class TrainedRun:
    """What a stage's Ray Train run left: its final state and weights, and its identity."""

    state: dict
    weights: dict[str, torch.Tensor]
    kept: dict  # the metrics reported with the checkpoint `weights` come from
    inputs: dict  # the stage's inputs (allmrec.stages.stage_inputs): its manifest records them
    name: str  # the Ray Train run
    seconds: float
    users: np.ndarray  # the training users the workers shared

    @property
    def users_record(self) -> dict:
        """What a manifest records of the training users: how many, and their digest (a test
        or a reader checks them against the data's roles: `users_sha256`)."""
        return {"train_users": len(self.users), "train_users_sha256": users_sha256(self.users)}


def users_sha256(users) -> str:
    """A digest of a set of user ids (sorted, int64)."""
    ids = np.sort(np.asarray(users, dtype=np.int64))
    return hashlib.sha256(ids.tobytes()).hexdigest()


def train_stage(
    stage: str,
    config: Config,
    run_dir: Path,
    *,
    loop,
    loop_config: dict,
    users: np.ndarray,
    scaling: TrainScaling,
    storage: str,
    weights_file: str,
    checkpoints_to_keep: int = 1,
    callbacks: list | None = None,
    describe: str = "",
    best_by: str | None = None,
    run_home: str | None = None,
) -> TrainedRun:
    """The driver's side of a Train stage: the training `users` (each worker takes its share,
    `allmrec.data.prepared.worker_users`), the run named by the stage's inputs (a restarted
    driver resumes it), fitted, and read back: the final checkpoint's state, and the weights of
    the final checkpoint or, with `best_by`, of the checkpoint Ray scored best by that metric.
    With tracking on and the run's `run_home`, every report of rank 0 goes to the stage's MLflow
    run as it comes."""
    started = time.perf_counter()
    # The users go in the loop config, not as a Ray Dataset: a list of ids needs no Ray Data
    # (whose split coordinator is one more actor process a run) and the workers read the
    # interactions themselves from the prepared data.
    loop_config = {**loop_config, "train_users": [int(u) for u in users]}
    inputs = stage_inputs(stage, config, run_dir)
    name = run_name(stage, inputs)
    live = open_live_run(config, run_home, stage, inputs) if run_home else None
    if live is not None:
        callbacks = [*(callbacks or []), MlflowReports(tracking_uri(config), live)]
    trainer = make_trainer(
        loop,
        loop_config,
        scaling,
        storage,
        name,
        checkpoints_to_keep,
        callbacks,
        best_by,
    )
    log.info("%s, run %s", describe or stage, name)
    try:
        state, weights, kept = fit_and_load(trainer, weights_file, best_by)
    except BaseException:
        with contextlib.suppress(Exception):  # the stage's own error is the one to see
            fail_live_run(config, live)
        raise
    return TrainedRun(
        state, weights, kept, inputs, name, time.perf_counter() - started, np.asarray(users)
    )


def fit_and_load(
    trainer: TorchTrainer, weights_file: str, best_by: str | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Run `trainer`; return the final checkpoint's `state.json`, and the `weights_file` of the
    final checkpoint, or of the best one by `best_by`, with the metrics reported with it."""
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    best, kept = result.checkpoint, result.metrics
    if best_by:
        best = result.get_best_checkpoint(best_by, "max")
        kept = next((m for c, m in result.best_checkpoints if c.path == best.path), {})
    with best.as_directory() as ckpt:
        weights = load_file(str(Path(ckpt) / weights_file))
    return state, weights, kept


def print_epoch(stage: str, metrics: dict, prefix: str = "") -> None:
    """One progress line per epoch from rank 0 (Ray forwards worker stdout to the driver),
    in the format of every line allmrec prints (`allmrec.console.progress_line`)."""
    line = " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
    say(stage, prefix + line)
