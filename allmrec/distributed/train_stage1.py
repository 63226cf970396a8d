"""Ray Train + DeepSpeed: Stage 1, aligning the frozen CF item embeddings with item texts.

Each worker holds the frozen CF backbone outside the engine (it is not trained; its E and x_u
are computed once) and a DeepSpeed engine around the Sentence-BERT and the two autoencoders,
ZeRO stage from config (3 by default: the engine's parameters are partitioned across workers).
Every epoch: a DeepSpeed checkpoint (each worker its shard) plus the gathered weights, and
`ray.train.report`; a worker that dies is replaced and the run resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint
from safetensors.torch import save_file

from allmrec.config import Config, Stage1Config, config_to_dict
from allmrec.data.prepared import load_prepared
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
from allmrec.models.alignment import CollabTextAligner, set_text_encoder_trainable
from allmrec.plots import plot_curves
from allmrec.storage import RunStorage, open_run
from allmrec.text_encoder import load_sentence_encoder
from allmrec.training.cf import load_cf_model, write_json
from allmrec.training.stage1 import (
    collapse_stats,
    encode_texts,
    frozen_cf_inputs,
    item_texts,
    joint_embeddings,
    stage1_batch,
    stage1_quality,
    to_device,
    tokenize,
    training_users,
)
from allmrec.training.zero import deepspeed_config, full_state_dict, gathered, local_share

log = logging.getLogger(__name__)
WEIGHTS = "aligner.safetensors"  # the gathered state dict inside each Ray checkpoint


def build_aligner(config: Config, cf_dim: int, device: str = "cpu") -> CollabTextAligner:
    """The Sentence-BERT named by `data.text_encoder` and both autoencoders."""
    cfg = config.stage1
    text_encoder = load_sentence_encoder(config.data.text_encoder, device=device)
    set_text_encoder_trainable(text_encoder, cfg.text_encoder_trainable)
    text_dim = int(text_encoder.get_embedding_dimension())
    return CollabTextAligner(text_encoder, cf_dim, text_dim, cfg.latent_dim)


def _optimizer(aligner: CollabTextAligner, cfg: Stage1Config) -> torch.optim.Optimizer:
    groups = [
        {
            "params": list(aligner.item_ae.parameters()) + list(aligner.text_ae.parameters()),
            "lr": cfg.lr,
        }
    ]
    text_params = [p for p in aligner.text_encoder.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr or cfg.lr})
    return torch.optim.Adam(groups, betas=(0.9, 0.98))


def _probe_loss(engine, aligner, users, data, frozen, texts, cfg, seed, device, q_cache) -> dict:
    """Losses on a fixed first batch (eval mode): the same for any number of workers."""
    batch = stage1_batch(users[: cfg.batch_size], data, frozen, texts, np.random.default_rng(seed))
    engine.eval()
    with torch.no_grad():
        losses = aligner.losses(
            *_model_inputs(batch, aligner, cfg, device, q_cache), cfg.alpha, cfg.beta
        )
    engine.train()
    return {f"probe_{k}": v for k, v in losses.as_floats().items()}


def _model_inputs(
    batch: dict, aligner: CollabTextAligner, cfg: Stage1Config, device, q_cache: torch.Tensor | None
):
    """Model inputs of a batch; with a frozen text encoder, q_i from the cache, not a forward."""
    if q_cache is not None:
        q_pos, q_neg = q_cache[batch["pos"]].to(device), q_cache[batch["neg"]].to(device)
    else:
        encoder = aligner.text_encoder
        q_pos = to_device(tokenize(encoder, batch["pos_texts"], cfg.max_text_tokens), device)
        q_neg = to_device(tokenize(encoder, batch["neg_texts"], cfg.max_text_tokens), device)
    return (
        batch["x_u"].to(device),
        batch["e_pos"].to(device),
        batch["e_neg"].to(device),
        q_pos,
        q_neg,
    )


def stage1_train_loop(loop_config: dict) -> None:
    """`train_loop_per_worker` of the Stage 1 TorchTrainer."""
    config = Config.model_validate(loop_config["config"])
    cfg, seed = config.stage1, config.seed
    rank, world, device = deepspeed_worker(cfg.scaling)
    import deepspeed  # after deepspeed_worker: it names the accelerator first

    setup_started = time.perf_counter()
    run_dir = RunStorage.open(loop_config["run"]).pull("data", "cf")
    data = load_prepared(run_dir)
    cf_model, _ = load_cf_model(run_dir, data)
    frozen = frozen_cf_inputs(cf_model, data, cf_model.config.max_len)
    texts, no_train, cold_label = item_texts(data)
    torch.manual_seed(seed)  # the same initial autoencoders on every worker
    aligner = build_aligner(config, frozen.item_table.shape[1])
    engine, _, _, _ = deepspeed.initialize(
        model=aligner,
        optimizer=_optimizer(aligner, cfg),
        config=deepspeed_config(cfg.zero_stage, cfg.batch_size, bf16=cfg.scaling.use_gpu),
    )
    aligner = engine.module
    share = local_share(list(aligner.parameters()))
    q_cache = None
    if cfg.text_encoder_trainable == "frozen":  # q_i never changes: encode every text once
        with gathered(list(aligner.text_encoder.parameters())):
            q_cache = encode_texts(aligner, texts, device, max_tokens=cfg.max_text_tokens)
    if rank == 0:
        print(
            f"[stage1] set up in {time.perf_counter() - setup_started:.1f} s; this worker holds "
            f"{share:.1%} of the trained parameters' elements",
            flush=True,
        )

    state = restore_deepspeed(engine)
    if state is None:
        state = {"epoch": 0, "history": [], "best_hit1": -1.0, "best_epoch": 0}
    else:
        state.setdefault("resumed_from", []).append(state["epoch"])
        print(f"[stage1] rank {rank}: resumed from epoch {state['epoch']}", flush=True)

    shard_users = shard_user_ids("train")  # each worker trains on its Ray Data shard of users
    all_users = training_users(data)
    if state["epoch"] == 0:
        state["probe"] = _probe_loss(
            engine, aligner, all_users, data, frozen, texts, cfg, seed, device, q_cache
        )
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        maybe_fail(cfg.fail_at_epoch, epoch, rank, loop_config["marker_dir"])
        started = time.perf_counter()
        rng = np.random.default_rng([seed, epoch, rank])
        torch.manual_seed(int(rng.integers(2**62)))  # dropout, reproducible across resumes
        order = rng.permutation(shard_users)
        sums = np.zeros(6)
        engine.train()
        for start in range(0, len(order), cfg.batch_size):
            batch = stage1_batch(order[start : start + cfg.batch_size], data, frozen, texts, rng)
            losses = aligner.losses(
                *_model_inputs(batch, aligner, cfg, device, q_cache), cfg.alpha, cfg.beta
            )
            engine.backward(losses.total)
            engine.step()
            sums += [*losses.as_floats().values(), 1.0]
        totals = all_reduce_sum(sums.tolist())
        steps = max(totals[-1], 1)
        metrics = {
            "epoch": epoch,
            **{
                f"loss_{k}" if k != "total" else "loss": v / steps
                for k, v in zip(
                    ("total", "match", "item_recon", "text_recon", "rec"), totals[:5], strict=True
                )
            },
            "epoch_seconds": time.perf_counter() - started,
            "local_param_share": share,
        }
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics.update(
                _validate(
                    aligner,
                    frozen,
                    texts,
                    data,
                    cold_label,
                    no_train,
                    cfg,
                    seed,
                    rank,
                    world,
                    device,
                    q_cache,
                )
            )
            if metrics["valid_hit@1"] > state["best_hit1"]:
                state.update(best_hit1=metrics["valid_hit@1"], best_epoch=epoch)
        state["epoch"] = epoch
        state["history"].append(metrics)
        if rank == 0:
            print_epoch("stage1", metrics)
        if epoch % cfg.checkpoint_every and epoch != cfg.epochs:
            ray.train.report(metrics)
            continue
        frozen_text = cfg.text_encoder_trainable == "frozen"
        # Collective under ZeRO-3: every rank gathers; a frozen text encoder is not saved (it is
        # the one named in the config, loaded again as it was).
        weights = full_state_dict(aligner.item_ae, "item_ae.") | full_state_dict(
            aligner.text_ae, "text_ae."
        )
        if not frozen_text:
            weights |= full_state_dict(aligner.text_encoder, "text_encoder.")
        with tempfile.TemporaryDirectory() as tmp:
            # each rank writes its own shard of the trained parameters and optimizer state
            engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
            if rank == 0:
                save_file(weights, str(Path(tmp) / WEIGHTS))
                write_json(Path(tmp) / "state.json", state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _validate(
    aligner, frozen, texts, data, cold_label, no_train, cfg, seed, rank, world, device, q_cache
) -> dict:
    users = data.eval_users("valid")
    if cfg.eval_users is not None:
        users = np.random.default_rng(seed).permutation(users)[: cfg.eval_users]
    # Whole weights on every rank for evaluation; a frozen text encoder's q_i are cached (its
    # ZeRO-3-partitioned forward over every item text took ~30 s per validation here).
    params = [*aligner.item_ae.parameters(), *aligner.text_ae.parameters()]
    if q_cache is None:
        params += list(aligner.text_encoder.parameters())
    with gathered(params):
        if q_cache is not None:
            q = q_cache
        else:
            q = encode_texts(aligner, texts, device, max_tokens=cfg.max_text_tokens)
        m = stage1_quality(aligner, frozen, q, data, cold_label, seed, users[rank::world])
        z = joint_embeddings(aligner, frozen, q, no_train)[1:]
    n = m.pop("valid_users")
    keys = sorted(m)
    sums = all_reduce_sum([n] + [m[k] * n for k in keys])
    out = {k: v / max(sums[0], 1) for k, v in zip(keys, sums[1:], strict=True)}
    out.update({f"z_{k}": v for k, v in collapse_stats(z).items()})
    return out


def write_stage1_artifact(
    out: Path,
    aligner: CollabTextAligner,
    frozen,
    texts: list[str],
    no_train: np.ndarray,
    max_tokens: int,
) -> dict:
    """stage1/: autoencoders and text encoder as safetensors, z_i of every item as Parquet."""
    save_file(
        {k: v.contiguous() for k, v in aligner.item_ae.state_dict().items()},
        str(out / "item_autoencoder.safetensors"),
    )
    save_file(
        {k: v.contiguous() for k, v in aligner.text_ae.state_dict().items()},
        str(out / "text_autoencoder.safetensors"),
    )
    aligner.text_encoder.save(str(out / "text_encoder"), safe_serialization=True)
    q = encode_texts(aligner, texts, "cpu", max_tokens=max_tokens)
    z = joint_embeddings(aligner, frozen, q, no_train)
    dim = z.shape[1]
    table = pa.table(
        {
            "item_idx": pa.array(np.arange(1, len(z), dtype=np.int32)),
            "z": pa.FixedSizeListArray.from_arrays(
                pa.array(z[1:].reshape(-1).numpy(), pa.float32()), dim
            ),
            "source": pa.array(np.where(no_train[1:], "text", "item")),
        }
    )
    pq.write_table(table, out / "joint_item_emb.parquet")
    return {
        "items": len(z) - 1,
        "text_path_items": int(no_train[1:].sum()),
        **collapse_stats(z[1:]),
    }


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
    cf_model, cf_manifest = load_cf_model(run_dir, data)  # fail early, with a clear message
    started = time.perf_counter()
    users = training_users(data)
    if cfg.max_train_users is not None:
        users = np.sort(
            np.random.default_rng(config.seed).permutation(users)[: cfg.max_train_users]
        )
    ray.data.DataContext.get_current().enable_progress_bars = False  # epoch lines are progress
    train_ds = ray.data.from_items([{"user_idx": int(u)} for u in users]).materialize()
    storage = storage or run.uri("checkpoints")
    settings = config_to_dict(config)
    name = run_name(
        "stage1",
        {
            "stage1": settings["stage1"],
            "text": settings["data"]["text_encoder"],
            "seed": config.seed,
            "data": data.fingerprint,
            "cf": cf_manifest["model_sha256"],
        },
    )
    trainer = make_trainer(
        stage1_train_loop,
        {"config": settings, "run": run.home},
        cfg.scaling,
        storage,
        name,
        {"train": train_ds},
        checkpoints_to_keep=1,
        callbacks=callbacks,
    )
    log.info(
        "Stage 1 (alpha=%s, beta=%s, ZeRO-%d, %d worker(s)), run %s",
        cfg.alpha,
        cfg.beta,
        cfg.zero_stage,
        cfg.scaling.num_workers,
        name,
    )
    state, weights = fit_and_load(trainer, WEIGHTS)
    train_seconds = time.perf_counter() - started
    if not write_artifact:
        return {"history": state["history"], "epochs_run": state["epoch"]}

    aligner = build_aligner(config, cf_model.item_embeddings().shape[1])
    missing, unexpected = aligner.load_state_dict(weights, strict=False)
    if (
        unexpected
        or any(not k.startswith("text_encoder.") for k in missing)
        or (missing and cfg.text_encoder_trainable != "frozen")
    ):
        raise RuntimeError(
            f"Stage 1 checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    aligner.eval()
    frozen = frozen_cf_inputs(cf_model, data, cf_model.config.max_len)
    texts, no_train, _ = item_texts(data)
    with staged_output(run_dir / "stage1") as out:
        joint = write_stage1_artifact(out, aligner, frozen, texts, no_train, cfg.max_text_tokens)
        plot_curves(
            state["history"],
            out / "curves.png",
            title=f"Stage 1 (alpha={cfg.alpha}, beta={cfg.beta})",
        )
        write_json(out / "history.json", {"history": state["history"]})
        last = state["history"][-1]
        manifest = write_manifest(
            out,
            "stage1",
            config=settings,
            data_fingerprint=data.fingerprint,
            cf_model_sha256=cf_manifest["model_sha256"],
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
            train_seconds=round(train_seconds, 1),
        )
    run.push("stage1")
    return manifest
