"""Ray Train + DeepSpeed: Stage 2, the projectors F_U and F_I in front of the frozen LLM.

The frozen LLM is inside the DeepSpeed engine's module together with the projectors
(`ALLMRecLM`): ZeRO-3 partitions only what is inside the engine, so with stage 3 each of N
workers holds about 1/N of the LLM's parameter elements (logged every epoch, with the worker's
memory). Only the projectors are trained (a torch Adam over them) and only they are
checkpointed: `exclude_frozen_parameters` keeps the LLM out of every checkpoint.

Every epoch, and every `checkpoint_every_steps` within one: a DeepSpeed checkpoint (each worker
its shard of the projectors and their optimizer state), the gathered projector weights and
`ray.train.report`; a worker that dies is replaced and the run resumes at that step.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint
from safetensors.torch import save_file

from allmrec.config import Config, config_to_dict
from allmrec.distributed.common import (
    all_reduce_sum,
    deepspeed_worker,
    fit_and_load,
    make_trainer,
    maybe_fail,
    print_epoch,
    restore_deepspeed,
    run_name,
    shard_user_ids,
)
from allmrec.manifest import staged_output, write_manifest
from allmrec.plots import plot_curves
from allmrec.storage import RunStorage, open_run
from allmrec.training.cf import write_json
from allmrec.training.stage2 import PROJECTORS_FILE as WEIGHTS
from allmrec.training.stage2 import (
    STAGE2_INPUTS,
    build_stage2_model,
    llm_dtype,
    load_stage2_inputs,
    stage1_sha256,
    stage2_training_users,
    training_examples,
)
from allmrec.training.zero import deepspeed_config, full_state_dict, local_share

log = logging.getLogger(__name__)


def memory_stats(device: torch.device) -> dict:
    """This worker's resident memory and, on a GPU, its peak allocated memory (GiB)."""
    stats = {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        stats["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return stats


def stage2_train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the Stage 2 TorchTrainer."""
    import deepspeed

    config = Config.model_validate(loop_config["config"])
    cfg, seed = config.stage2, config.seed
    rank, world, device = deepspeed_worker(cfg.scaling)

    setup_started = time.perf_counter()
    run_dir = RunStorage.open(loop_config["run"]).pull(*STAGE2_INPUTS)
    inputs = load_stage2_inputs(run_dir, config)
    torch.manual_seed(seed)  # the same initial projectors on every worker
    model = build_stage2_model(config, inputs.d_cf, inputs.d_joint)
    projector_params = [
        *model.user_projector.parameters(),
        *model.item_projector.parameters(),
    ]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.Adam(projector_params, lr=cfg.lr),
        config=deepspeed_config(
            cfg.zero_stage,
            cfg.batch_size,
            bf16=llm_dtype(config) == torch.bfloat16,
            grad_clip=cfg.grad_clip,
        ),
    )
    model = engine.module
    llm_share = local_share(list(model.llm.parameters()))
    if rank == 0:
        print(
            f"[stage2] set up in {time.perf_counter() - setup_started:.1f} s: "
            f"{type(model.llm).__name__}, "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.llm.parameters()) / 1e6:.1f}M "
            f"frozen parameters, ZeRO-{cfg.zero_stage}, this worker holds {llm_share:.1%} of "
            f"them; {memory_stats(device)['rss_gib']:.2f} GiB resident",
            flush=True,
        )

    state = restore_deepspeed(engine)
    if state is None:
        state = {"epoch": 0, "step": 0, "history": []}
    else:
        state.setdefault("resumed_from", []).append([state["epoch"], state["step"]])
        print(
            f"[stage2] rank {rank}: resumed after epoch {state['epoch']}, step {state['step']}",
            flush=True,
        )

    # Each worker trains on its Ray Data shard of users (equal shards: ZeRO-3's collectives
    # need every worker to take the same number of steps).
    shard_users = shard_user_ids("train")
    steps_per_epoch = math.ceil(len(shard_users) / cfg.batch_size)
    if "probe" not in state:
        state["probe"] = _probe_loss(engine, model, inputs, config, loop_config["probe_users"])

    def save(metrics: dict) -> None:
        weights = full_state_dict(model.user_projector, "user_projector.") | full_state_dict(
            model.item_projector, "item_projector."
        )  # collective under ZeRO-3: every rank gathers
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
            if rank == 0:
                save_file(weights, str(Path(tmp) / WEIGHTS))
                write_json(Path(tmp) / "state.json", state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        maybe_fail(cfg.fail_at_epoch, epoch, rank, loop_config["marker_dir"])
        started = time.perf_counter()
        order = np.random.default_rng([seed, epoch, rank]).permutation(shard_users)
        sums = np.zeros(4)  # loss sum, steps, samples, tokens
        engine.train()
        for step in range(state["step"], steps_per_epoch):
            batch_users = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            # a generator per step: a resumed epoch draws the same negatives and orders
            rng = np.random.default_rng([seed, epoch, rank, step])
            examples = training_examples(batch_users, inputs, config, rng)
            batch = model.collate(examples).to(device)
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            sums += [loss.item(), 1, len(examples), int(batch.attention_mask.sum())]
            state["step"] = step + 1
            if rank == 0 and (step + 1) % 10 == 0:
                print(
                    f"[stage2] epoch {epoch} step {step + 1}/{steps_per_epoch} "
                    f"loss {sums[0] / sums[1]:.4f} "
                    f"({sums[2] / (time.perf_counter() - started):.2f} samples/s on this worker)",
                    flush=True,
                )
            every = cfg.checkpoint_every_steps
            if every and (step + 1) % every == 0 and step + 1 < steps_per_epoch:
                save({"epoch": epoch, "step": step + 1, "loss": sums[0] / sums[1]})
        totals = all_reduce_sum(sums.tolist())
        seconds = time.perf_counter() - started
        memory = all_reduce_sum([memory_stats(device)["rss_gib"]])[0] / world
        metrics = {
            "epoch": epoch,
            "loss": totals[0] / max(totals[1], 1),
            "samples_per_second": totals[2] / seconds,
            "tokens_per_second": totals[3] / seconds,
            "epoch_seconds": seconds,
            "llm_local_param_share": llm_share,
            "mean_worker_rss_gib": memory,
            **{f"rank0_{k}": v for k, v in memory_stats(device).items() if rank == 0},
        }
        state.update(epoch=epoch, step=0)
        state["history"].append(metrics)
        if rank == 0:
            print_epoch("stage2", metrics)
        save(metrics)


@torch.no_grad()
def _probe_loss(engine, model, inputs, config: Config, users: list[int]) -> float:
    """The loss on a fixed first batch before training: the same for any number of workers."""
    rng = np.random.default_rng([config.seed, 0])
    batch = model.collate(training_examples(np.asarray(users), inputs, config, rng))
    engine.eval()
    loss = float(engine(batch.to(model.device)))
    engine.train()
    return loss


def train_stage2(config: Config, run_dir: str | Path | RunStorage) -> dict:
    """Stage 2 on the run's data, CF model and Stage 1; writes its `stage2/`."""
    from allmrec.llm import EMBEDDED_PREFIX, embedded_llm_path

    cfg = config.stage2
    run = open_run(run_dir)
    run_dir = run.pull(*STAGE2_INPUTS)
    inputs = load_stage2_inputs(run_dir, config)  # fail early, with a clear message
    if cfg.llm.startswith(EMBEDDED_PREFIX):
        embedded_llm_path(cfg.llm)  # dequantize once here, not in every worker at once
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    users = rng.permutation(stage2_training_users(inputs.data))
    if cfg.train_user_share < 1:
        users = users[: max(1, round(cfg.train_user_share * len(users)))]
    if cfg.max_train_users is not None:
        users = users[: cfg.max_train_users]
    users = np.sort(users)
    stage1_hash = stage1_sha256(run_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds = ray.data.from_items([{"user_idx": int(u)} for u in users]).materialize()
    settings = config_to_dict(config)
    name = run_name(
        "stage2",
        {
            "stage2": settings["stage2"],
            "domain": settings["data"]["domain"],
            "seed": config.seed,
            "data": inputs.data.fingerprint,
            "cf": inputs.cf_manifest["model_sha256"],
            "stage1": stage1_hash,
        },
    )
    trainer = make_trainer(
        stage2_train_loop,
        {
            "config": settings,
            "run": run.home,
            "probe_users": [int(u) for u in users[: cfg.batch_size]],
        },
        cfg.scaling,
        run.uri("checkpoints"),
        name,
        {"train": train_ds},
        checkpoints_to_keep=1,
    )
    log.info(
        "Stage 2 (%s, ZeRO-%d, %d worker(s), %d users x %d epoch(s)), run %s",
        cfg.llm,
        cfg.zero_stage,
        cfg.scaling.num_workers,
        len(users),
        cfg.epochs,
        name,
    )
    state, weights = fit_and_load(trainer, WEIGHTS)
    train_seconds = time.perf_counter() - started

    with staged_output(run_dir / "stage2") as out:
        save_file(weights, str(out / WEIGHTS))
        plot_curves(state["history"], out / "curves.png", title=f"Stage 2 ({cfg.llm})")
        write_json(out / "history.json", {"history": state["history"]})
        last = state["history"][-1]
        manifest = write_manifest(
            out,
            "stage2",
            config=settings,
            data_fingerprint=inputs.data.fingerprint,
            cf_model_sha256=inputs.cf_manifest["model_sha256"],
            stage1_sha256=stage1_hash,
            llm={"name": cfg.llm, "dtype": str(llm_dtype(config)).removeprefix("torch.")},
            projector_shapes={k: list(v.shape) for k, v in weights.items()},
            train_users=len(users),
            epochs_run=state["epoch"],
            metrics={k: v for k, v in last.items() if k != "epoch"},
            probe_loss=state.get("probe"),
            resumed_from=state.get("resumed_from", []),
            workers=cfg.scaling.num_workers,
            zero_stage=cfg.zero_stage,
            train_seconds=round(train_seconds, 1),
        )
    run.push("stage2")
    return manifest
