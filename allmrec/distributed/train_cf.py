"""Ray Train: CF-RecSys pre-training (SASRec by default) with early stopping and resume.

`train_cf(config, run_dir)` runs a `TorchTrainer` whose workers each take their share of the
training users (`allmrec.data.prepared.worker_users`), train the backbone (DDP over gloo on CPU,
NCCL on GPU), validate every `cf.eval_every` epochs on HR@10/NDCG@10 against 100 sampled negatives,
and report metrics every epoch, with a checkpoint at every validation. A worker that dies is
replaced and training resumes from the last checkpoint (`FailureConfig`); a driver that dies resumes
the same run when started again with the same config and data. Ray Train scores the checkpoints by
validation NDCG@10 and keeps the best (and the latest): the best becomes `cf/model.safetensors`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint
from safetensors.torch import load_file

from allmrec.config import CFConfig, Config, config_to_dict
from allmrec.console import say
from allmrec.data.prepared import PreparedData, load_prepared, seeded_users, worker_users
from allmrec.distributed.common import (
    all_reduce_sum,
    maybe_fail,
    print_epoch,
    quiet_worker_warnings,
    train_stage,
)
from allmrec.evaluation import (
    SASREC_PROTOCOL,
    evaluate,
    model_scorer,
)
from allmrec.manifest import staged_output, write_manifest
from allmrec.plots import plot_curves
from allmrec.storage import RunStorage, open_run
from allmrec.training.cf import (
    MODEL_FILE,
    backbone_spec,
    build_cf_model,
    evaluate_cf_and_baselines,
    save_model,
    train_epoch,
    user_rows,
    write_json,
)

log = logging.getLogger(__name__)
BEST_BY = "valid_ndcg@10"  # Ray Train keeps the best checkpoint by it: cf/model.safetensors


def _validate(model, data, cfg: CFConfig, seed: int, rank: int, world: int) -> dict:
    """HR@10/NDCG@10 (100 negatives) on this worker's slice of users, summed over workers."""
    users = seeded_users(data.eval_users("valid"), cfg.eval_users, seed)
    mine = users[rank::world]
    m = evaluate(
        model_scorer(model, _device()),
        data,
        "valid",
        SASREC_PROTOCOL,
        seed,
        max_len=cfg.max_len,
        users=mine,
    )
    n = m["users"]
    total, hr, ndcg = all_reduce_sum([n, m["hit@10"] * n, m["ndcg@10"] * n])
    return {"valid_hr@10": hr / max(total, 1), "valid_ndcg@10": ndcg / max(total, 1)}


def _device() -> torch.device:
    return ray.train.torch.get_device()


def _shard_rows(worker: _Worker, loop_config: dict) -> dict[str, np.ndarray]:
    """This worker's users and their training sequences (from the prepared data it loaded),
    built once and reshuffled locally each epoch."""
    users = worker_users(loop_config["train_users"], worker.rank, worker.world)
    return user_rows(users, [worker.data.train[u] for u in users])


@dataclass
class _Worker:
    """One Ray Train worker of CF pre-training: its model (DDP over several workers), Adam,
    its shard of users and the resumable state."""

    cfg: CFConfig
    seed: int
    rank: int
    world: int
    data: PreparedData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: dict
    shard_rows: dict | None = None

    def train_epoch(self, epoch: int) -> dict:
        started = time.perf_counter()
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        # Dropout draws from torch's generator: seed it per epoch so a resumed run draws
        # exactly what an uninterrupted one would have.
        torch.manual_seed(int(rng.integers(2**62)))
        cfg = self.cfg
        loss_sum, batches = train_epoch(
            self.model,
            self.optimizer,
            self.shard_rows,
            cfg.batch_size,
            cfg.max_len,
            self.data.num_items,
            rng,
            _device(),
        )
        loss_total, batch_total = all_reduce_sum([loss_sum, batches])
        return {
            "epoch": epoch,
            "loss": loss_total / max(batch_total, 1),
            "epoch_seconds": time.perf_counter() - started,
        }

    def validate(self, epoch: int) -> dict:
        """Validation metrics; counts the evaluations without a better NDCG@10 (for patience:
        the best weights themselves are Ray's best-scored checkpoint)."""
        model = getattr(self.model, "module", self.model)
        metrics = _validate(model, self.data, self.cfg, self.seed, self.rank, self.world)
        if metrics["valid_ndcg@10"] > self.state["best_ndcg"]:
            self.state.update(best_ndcg=metrics["valid_ndcg@10"], best_epoch=epoch, bad_evals=0)
        else:
            self.state["bad_evals"] += 1
        return metrics

    def save(self, metrics: dict) -> None:
        """Report `metrics` with a checkpoint (one copy of the weights, from rank 0) when they
        hold a validation (Ray scores checkpoints by it), else without one."""
        if BEST_BY not in metrics:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_model(self.model, Path(tmp) / MODEL_FILE)
                torch.save(self.optimizer.state_dict(), Path(tmp) / "optimizer.pt")
                write_json(Path(tmp) / "state.json", self.state)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _set_up(loop_config: dict) -> _Worker:
    """The worker's data and model, restored from the run's checkpoint if there is one."""
    quiet_worker_warnings()
    cfg = CFConfig.model_validate(loop_config["cf"])
    seed = loop_config["seed"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, math.ceil(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(seed)  # the same initial weights on every worker
    data = load_prepared(RunStorage.open(loop_config["run"]).pull("data"))
    model = build_cf_model(cfg, data.num_users, data.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    state = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": 0, "bad_evals": 0, "history": []}
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            model.load_state_dict(load_file(str(ckpt / MODEL_FILE)))
            optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
            state = json.loads((ckpt / "state.json").read_text())
        state.setdefault("resumed_from", []).append(state["epoch"])
        say("cf", f"rank {rank}: resumed from epoch {state['epoch']}")
    model = ray.train.torch.prepare_model(model)  # DDP when several workers; to the device
    if optimizer_state is not None:  # after the move, so Adam's moments follow the params
        optimizer.load_state_dict(optimizer_state)
    return _Worker(cfg, seed, rank, world, data, model, optimizer, state)


def cf_train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the CF TorchTrainer: set up, restore, then per epoch train,
    validate (every `eval_every`), save; stop after `patience` evaluations without a better
    NDCG@10."""
    worker = _set_up(loop_config)
    cfg, state = worker.cfg, worker.state
    worker.shard_rows = _shard_rows(worker, loop_config)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        maybe_fail(cfg.fail_at_epoch, epoch, worker.rank, loop_config["marker_dir"])
        metrics = worker.train_epoch(epoch)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics |= worker.validate(epoch)
        state["epoch"] = epoch
        state["history"].append(metrics)
        stop = state["bad_evals"] >= cfg.patience
        metrics |= {"best_epoch": state["best_epoch"], "stopped_early": stop}
        if worker.rank == 0:
            print_epoch("cf", metrics)
        worker.save(metrics)
        if stop:
            break


def train_cf(config: Config, run_dir: str | Path | RunStorage) -> dict:
    """Pre-train the CF backbone on the run's `data/`, write its `cf/`; return the manifest."""
    cfg = config.cf
    run = open_run(run_dir)
    run_dir = run.pull("data")
    data = load_prepared(run_dir)
    users = data.training_users()
    trained = train_stage(
        "cf",
        config,
        run_dir,
        loop=cf_train_loop,
        loop_config={"cf": config_to_dict(config)["cf"], "seed": config.seed, "run": run.home},
        users=users,
        scaling=cfg.scaling,
        storage=run.uri("checkpoints"),
        weights_file=MODEL_FILE,
        best_by=BEST_BY,
        run_home=run.home,
        checkpoints_to_keep=1,  # the best; Ray keeps the latest besides
        describe=f"CF pre-training {cfg.backbone} on {len(users)} users x {data.num_items} "
        f"items ({cfg.scaling.num_workers} worker(s))",
    )
    state = trained.state
    torch.manual_seed(config.seed)
    model = build_cf_model(cfg, data.num_users, data.num_items)
    model.load_state_dict(trained.weights)
    model.eval()
    metrics = evaluate_cf_and_baselines(model, data, config.seed, cfg.max_len)
    with staged_output(run_dir / "cf") as out:
        save_model(model, out / MODEL_FILE)
        plot_curves(
            state["history"],
            out / "curves.png",
            title=f"{cfg.backbone} on {data.manifest['source']['name']}",
        )
        write_json(out / "history.json", {"history": state["history"]})
        manifest = write_manifest(
            out,
            "cf",
            config=config_to_dict(config),
            inputs=trained.inputs,
            backbone=backbone_spec(model),
            epochs_run=state["epoch"],
            best_epoch=state["best_epoch"],
            stopped_early=state["bad_evals"] >= cfg.patience,
            resumed_from_epochs=state.get("resumed_from", []),
            metrics=metrics,
            train_seconds=round(trained.seconds, 1),
            workers=cfg.scaling.num_workers,
            **trained.users_record,
        )
    run.push("cf")
    return manifest
