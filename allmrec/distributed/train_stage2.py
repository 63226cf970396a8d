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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from allmrec.config import Config, config_to_dict
from allmrec.console import say
from allmrec.data.prepared import worker_users
from allmrec.distributed.common import (
    all_reduce_sum,
    broadcast_from_rank0,
    by_rank,
    deepspeed_worker,
    maybe_fail,
    print_epoch,
    restore_deepspeed,
    save_deepspeed,
    train_stage,
)
from allmrec.llm_evaluation import validation_cases, validation_hits
from allmrec.manifest import staged_output, write_manifest
from allmrec.models.projection import ALLMRecLM
from allmrec.plots import plot_curves, plot_learning_curve
from allmrec.storage import RunStorage, open_run
from allmrec.training.cf import write_json
from allmrec.training.stage2 import PROJECTORS_FILE as WEIGHTS
from allmrec.training.stage2 import (
    STAGE2_INPUTS,
    TRAINED_MODULES,
    WEIGHTED_HIT,
    EvalCase,
    Stage2Inputs,
    build_stage2_model,
    keep_score,
    kept_key,
    kept_metric,
    llm_dtype,
    load_stage2_inputs,
    start_readouts,
    target_cold_weight,
    training_examples,
    training_targets,
    validation_users,
    validation_weights,
)
from allmrec.training.zero import deepspeed_config, full_state_dict, local_share, memory_stats

log = logging.getLogger(__name__)

# `stage2.keep: best`: what Ray Train scores Stage 2's checkpoints by (`_Worker.score`).
KEEP_SCORE = "kept_valid_hit@1"


@dataclass
class _Worker:
    """One Ray Train worker of Stage 2: its engine, model, data and resumable state."""

    config: Config
    engine: object  # the DeepSpeed engine around `model`
    model: ALLMRecLM
    inputs: Stage2Inputs
    rank: int
    world: int
    device: torch.device
    state: dict
    llm_share: float = 1.0  # of the frozen LLM's parameter elements this worker holds
    validation: list[EvalCase] = field(default_factory=list)  # this worker's share, padded
    # `validation_weights`, 0 for the padding cases: the sample's (`valid_hit@1`), the cold
    # items' (`valid_cold_hit@1`) and the weighted comparison's (`WEIGHTED_HIT`, or None)
    validation_weights: np.ndarray | None = None
    cold_validation: np.ndarray | None = None
    weighted_validation: np.ndarray | None = None
    cold_target_weight: float = 1.0  # a cold training target's weight in the rank loss
    marker_dir: str = ""  # where the test hook's failure markers go

    def save(self, metrics: dict) -> None:
        """A DeepSpeed checkpoint (each worker its shard), the gathered trained weights and
        `state.json`, reported to Ray Train with `metrics`."""
        weights = {}  # collective under ZeRO-3: every rank gathers
        for name in TRAINED_MODULES:
            module = getattr(self.model, name, None)
            if module is not None:
                weights |= full_state_dict(module, f"{name}.")
        save_deepspeed(self.engine, self.rank, weights, self.state, metrics, WEIGHTS)

    def score(self, point: dict | None) -> dict:
        """`stage2.keep: best`: the metric Ray scores checkpoints by, the valid Hit@1 of exactly
        the weights saved (a validation point taken at this very step), else -1: a checkpoint
        between points (for resuming only) is never the one kept. Equal Hit@1 goes to the
        point with fewer trained prompts (the start included): a later point is kept only for
        more validation hits, never for as many (Hit@1 moves by 1 / users, far above 1e-12 x
        prompts). A point after steps also gives up `stage2.keep_min_delta` to the start."""
        if self.config.stage2.keep != "best":
            return {}
        if not point:
            return {KEEP_SCORE: -1.0}
        return {KEEP_SCORE: keep_score(point, self.config.stage2.keep_min_delta)}

    def validate(self) -> dict:
        """Validation Hit@1 over every worker's share of the cases: a point of the curve."""
        if not self.validation:
            return {}
        started = time.perf_counter()
        self.engine.eval()
        hits = validation_hits(self.model, self.inputs, self.validation, self.config)
        self.engine.train()
        keys = sorted(hits)
        weights = self.validation_weights
        sums = [float(np.dot(hits[k], weights)) for k in keys] + [float(weights.sum())]
        by_weights = {}  # the readout's Hit@1 weighted otherwise
        if "valid_hit@1" in hits and self.weighted_validation is not None:
            by_weights = {"valid_cold_hit@1": self.cold_validation}
            by_weights[WEIGHTED_HIT] = self.weighted_validation
        for case_weights in by_weights.values():
            sums += [float(np.dot(hits["valid_hit@1"], case_weights)), float(case_weights.sum())]
        totals = all_reduce_sum(sums)
        point = {"prompts": self.state["prompts"]}
        point |= {k: totals[i] / totals[len(keys)] for i, k in enumerate(keys)}
        at = len(keys) + 1
        for i, name in enumerate(by_weights):
            if totals[at + 2 * i + 1]:  # no cold-item case: no cold Hit@1
                point[name] = totals[at + 2 * i] / totals[at + 2 * i + 1]
        point["validation_seconds"] = time.perf_counter() - started
        self.state["curve"].append(point)
        return point

    def train_step(self, epoch: int, step: int, pairs: list[tuple[int, int]]) -> list[float]:
        """One optimizer step on `pairs`: [loss, bypass loss, 1 step, prompts, tokens]."""
        # a generator per step: a resumed epoch draws the same negatives and orders
        rng = np.random.default_rng([self.config.seed, epoch, self.rank, step])
        examples = training_examples(pairs, self.inputs, self.config, rng, self.cold_target_weight)
        batch = self.model.collate(examples).to(self.device)
        losses = self.engine(batch)
        self.engine.backward(losses["loss"])
        self.engine.step()
        self.state["step"] = step + 1
        self.state["prompts"] += len(examples) * self.world  # equal shards
        main = float(losses.get("rank", losses["loss"]).detach())
        bypass = float(losses["bypass"].detach()) if "bypass" in losses else 0.0
        return [main, bypass, 1, len(examples), int(batch.attention_mask.sum())]

    def between_steps(self, epoch: int, steps_done: int, loss: float) -> None:
        """Inside an epoch: a validation point every `validate_every_steps` and a checkpoint
        every `checkpoint_every_steps`."""
        cfg = self.config.stage2
        point = None  # this step's validation point, when it takes one
        if cfg.validate_every_steps and steps_done % cfg.validate_every_steps == 0:
            point = self.validate()
            if self.rank == 0:
                print_epoch("stage2", point, "validation ")
        every = cfg.checkpoint_every_steps
        if (every and steps_done % every == 0) or (point is not None and cfg.keep == "best"):
            latest = self.state["curve"][-1] if self.state["curve"] else {}  # maybe an earlier one
            metrics = {"epoch": epoch, "step": steps_done, "prompts": self.state["prompts"]}
            metrics |= {"loss": loss} | {k: v for k, v in latest.items() if k.startswith("valid_")}
            self.save(metrics | self.score(point))

    def train_epoch(self, epoch: int, shard_users: np.ndarray) -> dict:
        """One epoch over this worker's users (resuming at `state['step']`), validating every
        `stage2.validate_every_steps`; the epoch's metrics, summed over the workers."""
        cfg, seed, rank = self.config.stage2, self.config.seed, self.rank
        pairs = training_targets(shard_users, self.inputs.data, self.config, epoch)
        order = np.random.default_rng([seed, epoch, rank]).permutation(len(pairs))
        steps = math.ceil(len(pairs) / cfg.batch_size)
        started = time.perf_counter()
        sums = np.zeros(5)  # loss sum, bypass loss sum, steps, prompts, tokens
        self.engine.train()
        for step in range(self.state["step"], steps):
            take = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            sums += self.train_step(epoch, step, [pairs[i] for i in take])
            if rank == 0 and (step + 1) % 10 == 0:
                say(
                    "stage2",
                    f"epoch {epoch} step {step + 1}/{steps} loss {sums[0] / sums[2]:.4f} "
                    f"({sums[3] / (time.perf_counter() - started):.2f} prompts/s on this worker)",
                )
            if step + 1 < steps:  # the epoch's end validates and saves anyway
                self.between_steps(epoch, step + 1, sums[0] / sums[2])
            maybe_fail(
                cfg.fail_at_epoch,
                epoch,
                rank,
                self.marker_dir,
                fail_at_step=cfg.fail_at_step,
                step=step + 1,
            )
        totals = all_reduce_sum(sums.tolist())
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "loss": totals[0] / max(totals[2], 1),
            "samples_per_second": totals[3] / seconds,
            "tokens_per_second": totals[4] / seconds,
            "epoch_seconds": seconds,
        }
        if self.model.bypass is not None:
            metrics["bypass_loss"] = totals[1] / max(totals[2], 1)
        return metrics


def _set_up(loop_config: dict) -> _Worker:
    """The worker's inputs, the model in its DeepSpeed engine, and the restored state."""
    config = Config.model_validate(loop_config["config"])
    cfg = config.stage2
    rank, world, device = deepspeed_worker(cfg.scaling)
    import deepspeed  # after deepspeed_worker: it names the accelerator first

    started = time.perf_counter()
    run_dir = RunStorage.open(loop_config["run"]).pull(*STAGE2_INPUTS)
    inputs = load_stage2_inputs(run_dir, config)
    torch.manual_seed(config.seed)  # the same initial weights on every worker
    model = build_stage2_model(config, inputs.d_cf, inputs.d_joint, d_text=inputs.d_text)

    def content_progress(epoch: int, epochs: int, loss: float) -> None:
        if rank == 0:
            say("stage2", f"content path: epoch {epoch}/{epochs}, loss {loss:.4f}")

    fit_errors = start_readouts(model, inputs, config, progress=content_progress)
    for fitted in (model.readout, model.bypass):
        if fitted is not None:
            broadcast_from_rank0(fitted)
    if rank == 0 and "content_transitions" in fit_errors:
        say(
            "stage2",
            f"content path trained on {fit_errors['content_transitions']:,} transitions in "
            f"{fit_errors['content_seconds']:.0f} s; the gate's cold weight "
            f"{fit_errors['gate_cold_weight']:g}",
        )
    trained = [p for name in TRAINED_MODULES for p in _parameters(model, name) if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.Adam(trained, lr=cfg.lr),
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
        layers = f", read at block {cfg.readout_layer}" if cfg.readout_layer else ""
        say(
            "stage2",
            f"set up in {time.perf_counter() - started:.1f} s: {cfg.objective} "
            f"objective{layers}, {type(model.llm).__name__}, "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.llm.parameters()) / 1e6:.1f}M "
            f"frozen parameters, ZeRO-{cfg.zero_stage}, this worker holds {llm_share:.1%} of "
            f"them; {memory_stats(device)['rss_gib']:.2f} GiB resident",
        )
    state = restore_deepspeed(engine)
    if state is None:
        state = {"epoch": 0, "step": 0, "prompts": 0, "history": [], "curve": []}
        state["readout_start"] = fit_errors
    else:
        state.setdefault("resumed_from", []).append([state["epoch"], state["step"]])
        say("stage2", f"rank {rank}: resumed after epoch {state['epoch']}, step {state['step']}")
    worker = _Worker(config, engine, model, inputs, rank, world, device, state, llm_share)
    readout_start = state.get("readout_start", fit_errors)
    worker.cold_target_weight = target_cold_weight(config, readout_start)
    cases = validation_cases(inputs, config)
    weights = validation_weights(
        cases, len(validation_users(inputs, config)), inputs, readout_start
    )
    share = math.ceil(len(cases) / world)
    mine = cases[rank::world]
    padding = np.zeros(share - len(mine))

    def my_share(case_weights: np.ndarray | None) -> np.ndarray | None:
        return None if case_weights is None else np.r_[case_weights[rank::world], padding]

    # Equal shares (ZeRO-3 forwards are collective): pad with the first case, weight 0.
    worker.validation = mine + mine[:1] * (share - len(mine))
    worker.validation_weights = my_share(weights.sample)
    worker.cold_validation = my_share(weights.cold)
    worker.weighted_validation = my_share(weights.weighted)
    return worker


def _parameters(model: ALLMRecLM, name: str) -> list:
    module = getattr(model, name, None)
    return list(module.parameters()) if module is not None else []


def stage2_train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the Stage 2 TorchTrainer: set up, restore, then per epoch
    train, validate, save."""
    worker = _set_up(loop_config)
    worker.marker_dir = loop_config["marker_dir"]
    cfg, state = worker.config.stage2, worker.state
    # Each worker trains on its share of users (equal shares: ZeRO-3's collectives need every
    # worker to take the same number of steps).
    shard_users = worker_users(loop_config["train_users"], worker.rank, worker.world)
    if "probe" not in state:
        state["probe"] = _probe_loss(worker, loop_config["probe_users"])
    if not state["curve"]:
        point = worker.validate()  # the untrained model: the curve's first point
        if point and worker.rank == 0:
            print_epoch("stage2", point, "validation ")
        if cfg.keep == "best" and point:  # ... which may be the one to keep
            valid = {k: v for k, v in point.items() if k.startswith("valid_")}
            worker.save({"epoch": 0, "step": 0, "prompts": 0} | valid | worker.score(point))
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        maybe_fail(
            cfg.fail_at_epoch,
            epoch,
            worker.rank,
            worker.marker_dir,
            fail_at_step=cfg.fail_at_step,
        )
        metrics = worker.train_epoch(epoch, shard_users)
        point = worker.validate()
        metrics |= {k: v for k, v in point.items() if k.startswith("valid_")}
        memory = all_reduce_sum([memory_stats(worker.device)["rss_gib"]])[0] / worker.world
        metrics["prompts"] = state["prompts"]
        metrics |= {"llm_local_param_share": worker.llm_share, "mean_worker_rss_gib": memory}
        metrics |= by_rank("llm_param_share", worker.llm_share, worker.rank, worker.world)
        if worker.rank == 0:
            metrics |= {f"rank0_{k}": v for k, v in memory_stats(worker.device).items()}
            print_epoch("stage2", metrics)
        state.update(epoch=epoch, step=0)
        state["history"].append(metrics)
        worker.save(metrics | worker.score(point))


@torch.no_grad()
def _probe_loss(worker: _Worker, users: list[int]) -> float:
    """The loss on a fixed first batch before training: the same for any number of workers."""
    config = worker.config
    rng = np.random.default_rng([config.seed, 0])
    pairs = training_targets(np.asarray(users), worker.inputs.data, config, epoch=0)
    pairs = pairs[: config.stage2.batch_size]
    batch = worker.model.collate(training_examples(pairs, worker.inputs, config, rng))
    worker.engine.eval()
    losses = worker.engine(batch.to(worker.device))
    worker.engine.train()
    return float(losses.get("rank", losses["loss"]))


def train_stage2(config: Config, run_dir: str | Path | RunStorage) -> dict:
    """Stage 2 on the run's data, CF model and Stage 1; writes its `stage2/`."""
    from allmrec.llm import EMBEDDED_PREFIX, embedded_llm_path

    cfg = config.stage2
    run = open_run(run_dir)
    run_dir = run.pull(*STAGE2_INPUTS)
    inputs = load_stage2_inputs(run_dir, config)  # fail early, with a clear message
    if cfg.llm.startswith(EMBEDDED_PREFIX):
        embedded_llm_path(cfg.llm)  # dequantize once here, not in every worker at once
    users = _training_users(config, inputs)
    settings = config_to_dict(config)
    trained = train_stage(
        "stage2",
        config,
        run_dir,
        loop=stage2_train_loop,
        loop_config={
            "config": settings,
            "run": run.home,
            "probe_users": [int(u) for u in users[: cfg.batch_size]],
        },
        users=users,
        scaling=cfg.scaling,
        storage=run.uri("checkpoints"),
        weights_file=WEIGHTS,
        best_by=KEEP_SCORE if cfg.keep == "best" else None,
        run_home=run.home,
        describe=f"Stage 2 ({cfg.llm}, ZeRO-{cfg.zero_stage}, {cfg.scaling.num_workers} "
        f"worker(s), {len(users)} users x {cfg.epochs} epoch(s))",
    )
    manifest = _write_stage2(run_dir / "stage2", config, trained, len(users))
    run.push("stage2")
    return manifest


def _training_users(config: Config, inputs) -> np.ndarray:
    """The users Stage 2 trains on: the data's training users (the few-shot K, cold users
    left out) and at most `max_train_users` of them, sorted."""
    cfg = config.stage2
    users = np.random.default_rng(config.seed).permutation(inputs.data.training_users())
    if cfg.max_train_users is not None:
        users = users[: cfg.max_train_users]
    return np.sort(users)


def _write_stage2(stage_dir: Path, config: Config, trained, num_users: int) -> dict:
    """stage2/: what was trained (never the LLM), the curves and the manifest."""
    cfg = config.stage2
    state, weights = trained.state, trained.weights
    # the curve's point of the weights kept (their validation Hit@1: the one they were kept by)
    kept_prompts = trained.kept.get("prompts", state["prompts"])
    kept_point = next((p for p in state["curve"] if p["prompts"] == kept_prompts), {})
    with staged_output(stage_dir) as out:
        save_file(weights, str(out / WEIGHTS))
        plot_curves(state["history"], out / "curves.png", title=f"Stage 2 ({cfg.llm})")
        plot_learning_curve(
            state["curve"], out / "learning_curve.png", f"Stage 2, {cfg.objective} objective"
        )
        write_json(out / "history.json", {"history": state["history"], "curve": state["curve"]})
        last = state["history"][-1]
        return write_manifest(
            out,
            "stage2",
            config=config_to_dict(config),
            inputs=trained.inputs,
            llm={"name": cfg.llm, "dtype": str(llm_dtype(config)).removeprefix("torch.")},
            objective=cfg.objective,
            readout=(
                {"kind": cfg.readout, "layer": cfg.readout_layer, "bypass": cfg.bypass}
                if cfg.objective == "rank"
                else None
            ),
            readout_start=state.get("readout_start", {}),
            train_prompts=state["prompts"],
            kept={
                "keep": cfg.keep,
                "prompts": kept_prompts,
                "valid_hit@1": kept_point.get(kept_key(kept_point, weighted=False)),
                "compared": kept_key(kept_point),
                "compared_value": kept_metric(kept_point),
                "min_delta": cfg.keep_min_delta,
            },
            curve=state["curve"],
            projector_shapes={k: list(v.shape) for k, v in weights.items()},
            **trained.users_record,
            epochs_run=state["epoch"],
            metrics={k: v for k, v in last.items() if k != "epoch"},
            probe_loss=state.get("probe"),
            resumed_from=state.get("resumed_from", []),
            workers=cfg.scaling.num_workers,
            zero_stage=cfg.zero_stage,
            train_seconds=round(trained.seconds, 1),
        )
