"""Ray Train + DeepSpeed: Stage 1, aligning the frozen CF item embeddings with item texts.

Each worker holds the frozen CF backbone outside the engine (it is not trained; its E and x_u
are computed once) and a DeepSpeed engine around the two autoencoders and a trained
Sentence-BERT, ZeRO stage from config (3 by default: the engine's parameters are partitioned
across workers). A frozen Sentence-BERT stays outside too: its q_i are computed once per
machine and read back, without loading it, by every later worker.
Every epoch: a DeepSpeed checkpoint (each worker its shard) plus the gathered weights, and
`ray.train.report`; a worker that dies is replaced and the run resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from allmrec.config import Config, Stage1Config, config_to_dict
from allmrec.console import say
from allmrec.data.prepared import PreparedData, load_prepared, seeded_users, worker_users
from allmrec.distributed.common import (
    all_reduce_sum,
    by_rank,
    deepspeed_worker,
    maybe_fail,
    print_epoch,
    restore_deepspeed,
    save_deepspeed,
    train_stage,
)
from allmrec.manifest import staged_output, write_manifest
from allmrec.models.alignment import CollabTextAligner
from allmrec.plots import plot_curves
from allmrec.storage import RunStorage, cache_dir, open_run
from allmrec.training.cf import load_cf_model, write_json
from allmrec.training.stage1 import (
    FrozenCF,
    build_aligner,
    collapse_stats,
    encode_across_workers,
    frozen_cf_inputs,
    frozen_text_encodings_of,
    item_texts,
    joint_embeddings,
    stage1_batch,
    stage1_quality,
    to_device,
    tokenize,
    write_stage1_artifact,
)
from allmrec.training.zero import deepspeed_config, full_state_dict, gathered, local_share

log = logging.getLogger(__name__)
WEIGHTS = "aligner.safetensors"  # the gathered state dict inside each Ray checkpoint


def _text_encoding_cache(cfg: Stage1Config) -> Path | None:
    """Where a frozen text encoder's q_i are kept on this machine, for the workers
    (`frozen_text_encodings_of`) and the artifact's writer (`frozen_text_encodings`, keyed by
    the loaded encoder's weights: its own entries); None for a trained encoder."""
    return cache_dir() / "text-encodings" if cfg.text_encoder_trainable == "frozen" else None


def _optimizer(aligner: CollabTextAligner, cfg: Stage1Config) -> torch.optim.Optimizer:
    groups = [
        {
            "params": list(aligner.item_ae.parameters()) + list(aligner.text_ae.parameters()),
            "lr": cfg.lr,
        }
    ]
    encoder = aligner.text_encoder  # None when frozen: its q_i come computed
    text_params = [] if encoder is None else [p for p in encoder.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr or cfg.lr})
    return torch.optim.Adam(groups, betas=(0.9, 0.98))


@dataclass
class _Worker:
    """One Ray Train worker of Stage 1: its engine around the aligner, the frozen CF inputs,
    the item texts (and their cached q_i when the text encoder is frozen) and resumable state."""

    config: Config
    engine: object  # the DeepSpeed engine around `aligner`
    aligner: CollabTextAligner
    data: PreparedData
    frozen: FrozenCF
    texts: list[str]
    no_train: np.ndarray  # by item id: no training interaction, z_i from the text path
    cold_label: np.ndarray  # by item id: the data's cold label
    rank: int
    world: int
    device: torch.device
    share: float  # of the trained parameters' elements this worker holds
    q_cache: torch.Tensor | None
    state: dict = field(default_factory=dict)

    def model_inputs(self, batch: dict) -> tuple:
        """Model inputs of a batch; with a frozen text encoder, q_i from the cache, not a
        forward."""
        if self.q_cache is not None:
            q_pos = self.q_cache[batch["pos"]].to(self.device)
            q_neg = self.q_cache[batch["neg"]].to(self.device)
        else:
            encoder, max_tokens = self.aligner.text_encoder, self.config.stage1.max_text_tokens
            q_pos = to_device(tokenize(encoder, batch["pos_texts"], max_tokens), self.device)
            q_neg = to_device(tokenize(encoder, batch["neg_texts"], max_tokens), self.device)
        x_u, e_pos, e_neg = (batch[k].to(self.device) for k in ("x_u", "e_pos", "e_neg"))
        return x_u, e_pos, e_neg, q_pos, q_neg

    def losses(self, batch: dict):
        cfg = self.config.stage1
        return self.aligner.losses(*self.model_inputs(batch), cfg.alpha, cfg.beta)

    @torch.no_grad()
    def probe(self) -> dict:
        """Losses on a fixed first batch (eval mode): the same for any number of workers."""
        cfg, seed = self.config.stage1, self.config.seed
        users = self.data.training_users()[: cfg.batch_size]
        batch = stage1_batch(users, self.data, self.frozen, self.texts, np.random.default_rng(seed))
        self.engine.eval()
        losses = self.losses(batch)
        self.engine.train()
        return {f"probe_{k}": v for k, v in losses.as_floats().items()}

    def train_epoch(self, epoch: int, shard_users: np.ndarray) -> dict:
        """One epoch over this worker's users; the epoch's mean losses over all workers."""
        cfg = self.config.stage1
        started = time.perf_counter()
        rng = np.random.default_rng([self.config.seed, epoch, self.rank])
        torch.manual_seed(int(rng.integers(2**62)))  # dropout, reproducible across resumes
        order = rng.permutation(shard_users)
        sums = np.zeros(6)
        self.engine.train()
        for start in range(0, len(order), cfg.batch_size):
            users = order[start : start + cfg.batch_size]
            losses = self.losses(stage1_batch(users, self.data, self.frozen, self.texts, rng))
            self.engine.backward(losses.total)
            self.engine.step()
            sums += [*losses.as_floats().values(), 1.0]
        totals = all_reduce_sum(sums.tolist())
        steps = max(totals[-1], 1)
        names = ("loss", "loss_match", "loss_item_recon", "loss_text_recon", "loss_rec")
        return {
            "epoch": epoch,
            **{name: v / steps for name, v in zip(names, totals[:5], strict=True)},
            "epoch_seconds": time.perf_counter() - started,
            "local_param_share": self.share,
            **by_rank("param_share", self.share, self.rank, self.world),
        }

    def validate(self) -> dict:
        """Validation Hit@1/NDCG@10 (warm and cold-text items) over every worker's share of the
        users, and the collapse statistics of z_i."""
        cfg, aligner = self.config.stage1, self.aligner
        users = seeded_users(self.data.eval_users("valid"), cfg.eval_users, self.config.seed)
        # Whole weights on every rank for evaluation; a frozen text encoder's q_i are cached
        # (its ZeRO-3-partitioned forward over every item text took ~30 s a validation here).
        params = [*aligner.item_ae.parameters(), *aligner.text_ae.parameters()]
        if self.q_cache is None:
            params += list(aligner.text_encoder.parameters())
        with gathered(params):
            q = self.q_cache
            if q is None:
                q = encode_across_workers(
                    aligner.text_encoder,
                    self.texts,
                    self.device,
                    cfg.max_text_tokens,
                    self.rank,
                    self.world,
                )
            m = stage1_quality(
                aligner,
                self.frozen,
                q,
                self.data,
                self.cold_label,
                self.config.seed,
                users[self.rank :: self.world],
            )
            z = joint_embeddings(aligner, self.frozen, q, self.no_train)[1:]
        n = m.pop("valid_users")
        keys = sorted(m)
        sums = all_reduce_sum([n] + [m[k] * n for k in keys])
        out = {k: v / max(sums[0], 1) for k, v in zip(keys, sums[1:], strict=True)}
        return out | {f"z_{k}": v for k, v in collapse_stats(z).items()}

    def save(self, metrics: dict) -> None:
        """A checkpoint of the autoencoders (and a trained text encoder), reported with
        `metrics`. A frozen text encoder is not saved: it is the one the config names."""
        # collective under ZeRO-3: every rank gathers
        weights = full_state_dict(self.aligner.item_ae, "item_ae.")
        weights |= full_state_dict(self.aligner.text_ae, "text_ae.")
        if self.config.stage1.text_encoder_trainable != "frozen":
            weights |= full_state_dict(self.aligner.text_encoder, "text_encoder.")
        save_deepspeed(self.engine, self.rank, weights, self.state, metrics, WEIGHTS)


def _set_up(loop_config: dict) -> _Worker:
    """The worker's data and frozen CF inputs, the aligner in its DeepSpeed engine, the cached
    q_i of a frozen text encoder, and the restored state."""
    config = Config.model_validate(loop_config["config"])
    cfg = config.stage1
    rank, world, device = deepspeed_worker(cfg.scaling)
    import deepspeed  # after deepspeed_worker: it names the accelerator first

    started = time.perf_counter()
    run_dir = RunStorage.open(loop_config["run"]).pull("data", "cf")
    data = load_prepared(run_dir)
    cf_model, _ = load_cf_model(run_dir, data)
    frozen = frozen_cf_inputs(cf_model, data, cf_model.config.max_len)
    texts, no_train, cold_label = item_texts(data)
    q_cache = None
    if cfg.text_encoder_trainable == "frozen":
        # q_i never change: every text encoded once (kept per machine), and the encoder
        # stays out of the engine (nothing of it is trained or saved)
        q_cache = frozen_text_encodings_of(
            config.data.text_encoder,
            texts,
            device,
            cfg.max_text_tokens,
            _text_encoding_cache(cfg),
            dtype=torch.bfloat16 if cfg.scaling.use_gpu else torch.float32,
        )
    torch.manual_seed(config.seed)  # the same initial autoencoders on every worker
    text_dim = None if q_cache is None else q_cache.shape[1]
    aligner = build_aligner(config, frozen.item_table.shape[1], text_dim=text_dim)
    engine, _, _, _ = deepspeed.initialize(
        model=aligner,
        optimizer=_optimizer(aligner, cfg),
        config=deepspeed_config(cfg.zero_stage, cfg.batch_size, bf16=cfg.scaling.use_gpu),
    )
    aligner = engine.module
    share = local_share(list(aligner.parameters()))
    if rank == 0:
        say(
            "stage1",
            f"set up in {time.perf_counter() - started:.1f} s; this worker holds "
            f"{share:.1%} of the trained parameters' elements",
        )
    state = restore_deepspeed(engine)
    if state is None:
        state = {"epoch": 0, "history": [], "best_hit1": -1.0, "best_epoch": 0}
    else:
        state.setdefault("resumed_from", []).append(state["epoch"])
        say("stage1", f"rank {rank}: resumed from epoch {state['epoch']}")
    return _Worker(
        config,
        engine,
        aligner,
        data,
        frozen,
        texts,
        no_train,
        cold_label,
        rank,
        world,
        device,
        share,
        q_cache,
        state,
    )


def stage1_train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the Stage 1 TorchTrainer: set up, restore, then per epoch
    train, validate (every `eval_every`), save (every `checkpoint_every`)."""
    worker = _set_up(loop_config)
    cfg, state = worker.config.stage1, worker.state
    # each worker trains on its share of users
    shard_users = worker_users(loop_config["train_users"], worker.rank, worker.world)
    if state["epoch"] == 0:
        state["probe"] = worker.probe()
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        maybe_fail(cfg.fail_at_epoch, epoch, worker.rank, loop_config["marker_dir"])
        metrics = worker.train_epoch(epoch, shard_users)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics |= worker.validate()
            if metrics["valid_hit@1"] > state["best_hit1"]:
                state.update(best_hit1=metrics["valid_hit@1"], best_epoch=epoch)
        state["epoch"] = epoch
        state["history"].append(metrics)
        if worker.rank == 0:
            print_epoch("stage1", metrics)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            worker.save(metrics)
        else:
            ray.train.report(metrics)


def train_stage1(
    config: Config,
    run_dir: str | Path | RunStorage,
    *,
    storage: str | None = None,
    callbacks: list | None = None,
    write_artifact: bool = True,
) -> dict:
    """Stage 1 on the run's `data/` and `cf/`; writes its `stage1/`.

    A Tune trial passes its own `storage` (the Ray Train run's checkpoints), Tune's report
    callback, and `write_artifact=False`: it needs the metrics, not another stage1/.
    """
    cfg = config.stage1
    run = open_run(run_dir)
    run_dir = run.pull("data", "cf")
    data = load_prepared(run_dir)
    cf_model, _ = load_cf_model(run_dir, data)  # fail early, with a clear message
    users = seeded_users(data.training_users(), cfg.max_train_users, config.seed)
    settings = config_to_dict(config)
    trained = train_stage(
        "stage1",
        config,
        run_dir,
        loop=stage1_train_loop,
        loop_config={"config": settings, "run": run.home},
        users=users,
        scaling=cfg.scaling,
        storage=storage or run.uri("checkpoints"),
        weights_file=WEIGHTS,
        callbacks=callbacks,
        run_home=run.home if write_artifact else None,  # a Tune trial: Tune's callback logs it
        describe=f"Stage 1 (alpha={cfg.alpha}, beta={cfg.beta}, ZeRO-{cfg.zero_stage}, "
        f"{cfg.scaling.num_workers} worker(s))",
    )
    state = trained.state
    if not write_artifact:
        return {"history": state["history"], "epochs_run": state["epoch"]}

    aligner = _trained_aligner(config, cf_model, trained.weights)
    manifest = _write_stage1(run_dir / "stage1", config, aligner, cf_model, data, trained)
    run.push("stage1")
    return manifest


def _trained_aligner(config: Config, cf_model, weights: dict) -> CollabTextAligner:
    """The aligner with the weights the Train run kept (a frozen text encoder's are not
    in them: it is loaded as it was)."""
    aligner = build_aligner(config, cf_model.item_embeddings().shape[1])
    missing, unexpected = aligner.load_state_dict(weights, strict=False)
    if (
        unexpected
        or any(not k.startswith("text_encoder.") for k in missing)
        or (missing and config.stage1.text_encoder_trainable != "frozen")
    ):
        raise RuntimeError(
            f"Stage 1 checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return aligner.eval()


def _write_stage1(
    stage_dir: Path, config: Config, aligner: CollabTextAligner, cf_model, data, trained
) -> dict:
    """stage1/: the autoencoders, every item's joint embedding, the curves and the manifest."""
    cfg, state = config.stage1, trained.state
    frozen = frozen_cf_inputs(cf_model, data, cf_model.config.max_len)
    texts, no_train, _ = item_texts(data)
    with staged_output(stage_dir) as out:
        joint = write_stage1_artifact(
            out, aligner, frozen, texts, no_train, cfg.max_text_tokens, _text_encoding_cache(cfg)
        )
        plot_curves(
            state["history"],
            out / "curves.png",
            title=f"Stage 1 (alpha={cfg.alpha}, beta={cfg.beta})",
        )
        write_json(out / "history.json", {"history": state["history"]})
        last = state["history"][-1]
        return write_manifest(
            out,
            "stage1",
            config=config_to_dict(config),
            inputs=trained.inputs,
            **trained.users_record,
            text_encoder={
                "name": config.data.text_encoder,
                "trainable": cfg.text_encoder_trainable,
                "dim": aligner.text_ae.encoder[0].in_features,
            },
            cf_dim=aligner.item_ae.encoder[0].in_features,
            latent_dim=cfg.latent_dim,
            epochs_run=state["epoch"],
            best_epoch=state["best_epoch"],
            metrics={k: v for k, v in last.items() if k.startswith(("valid_", "z_", "loss"))},
            probe=state.get("probe", {}),
            joint_embeddings=joint,
            resumed_from_epochs=state.get("resumed_from", []),
            workers=cfg.scaling.num_workers,
            zero_stage=cfg.zero_stage,
            local_param_share=last.get("local_param_share"),
            param_share_by_rank=[v for k, v in last.items() if k.startswith("param_share_rank")],
            train_seconds=round(trained.seconds, 1),
        )
