"""CF-RecSys pre-training pieces that know nothing of Ray: model from config, checkpoints,
the final `cf/` artifact, and loading it back for Stage 1 and Stage 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from allmrec.config import CFConfig
from allmrec.data.prepared import PreparedData
from allmrec.evaluation import (
    ALLMREC_PROTOCOL,
    SASREC_PROTOCOL,
    evaluate,
    model_scorer,
    popularity_scorer,
    random_scorer,
)
from allmrec.manifest import ArtifactError, file_sha256
from allmrec.models import BACKBONES, CFBackbone, build_backbone
from allmrec.sequences import training_batch
from allmrec.stages import read_manifest, recorded_upstream

MODEL_FILE = "model.safetensors"


def build_cf_model(cfg: CFConfig, num_users: int, num_items: int) -> CFBackbone:
    """The configured backbone; shared fields apply only where the backbone has them."""
    fields = {f.name for f in dataclasses.fields(BACKBONES[cfg.backbone].config_class)}
    shared = {"hidden_dim": cfg.hidden_dim, "max_len": cfg.max_len, "dropout_rate": cfg.dropout}
    hparams = {k: v for k, v in shared.items() if k in fields}
    unknown = set(cfg.backbone_args) - fields
    if unknown:
        raise ValueError(
            f"cf.backbone_args: {sorted(unknown)} are not hyperparameters of {cfg.backbone} "
            f"(it has {sorted(fields - {'num_items', 'num_users'})})"
        )
    hparams.update(cfg.backbone_args)
    return build_backbone(cfg.backbone, num_items=num_items, num_users=num_users, **hparams)


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights on the CPU, to be written at once: for a model already on the CPU these are
    the live parameters themselves (`.to("cpu")` copies nothing), so a dict kept while training
    goes on changes with it. (An earlier version kept the best epoch's weights that way and
    shipped the last epoch's.)"""
    model = getattr(model, "module", model)  # DDP wraps the model
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, path: Path) -> None:
    save_file(state_dict_cpu(model), str(path))


def backbone_spec(model: CFBackbone) -> dict:
    model = getattr(model, "module", model)
    return {"name": model.name, "config": dataclasses.asdict(model.config)}


def load_cf_model(
    run_dir: str | Path, data: PreparedData | None = None, device: str = "cpu"
) -> tuple[CFBackbone, dict]:
    """The frozen CF backbone of a run, refusing one trained on other data than `data`."""
    cf_dir = Path(run_dir) / "cf"
    manifest = read_manifest(cf_dir, "cf")
    trained_on = recorded_upstream(manifest, "data")
    if data is not None and trained_on != data.fingerprint:
        raise ArtifactError(
            f"{cf_dir / 'manifest.json'}: field 'inputs.upstream.data' is "
            f"{str(trained_on)[:12]}..., but {data.directory} holds data "
            f"{data.fingerprint[:12]}...; retrain the CF model on this data (allmrec train cf)"
        )
    spec = manifest["backbone"]
    config = dict(spec["config"])
    model = build_backbone(spec["name"], **config)
    path = cf_dir / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing, although {cf_dir / 'manifest.json'} exists")
    model.load_state_dict(load_file(str(path)))
    manifest = dict(manifest, model_sha256=file_sha256(path))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, manifest


def user_rows(user_idx: np.ndarray, items: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Training rows (one per user, sorted by user so the order never depends on the reader)."""
    order = np.argsort(user_idx, kind="stable")
    ragged = np.empty(len(items), dtype=object)  # one array per user, of varying length
    for row, i in enumerate(order):
        ragged[row] = np.asarray(items[i], dtype=np.int64)
    return {"user_idx": np.asarray(user_idx)[order], "items": ragged}


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: dict[str, np.ndarray],
    batch_size: int,
    max_len: int,
    num_items: int,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """One pass over `rows` in a seeded random order; returns (sum of batch losses, batches)."""
    model.train()
    order = rng.permutation(len(rows["user_idx"]))
    loss_sum, batches = 0.0, 0
    for start in range(0, len(order), batch_size):
        take = order[start : start + batch_size]
        seqs, pos, neg = training_batch(list(rows["items"][take]), max_len, num_items, rng)
        loss = model(
            torch.as_tensor(rows["user_idx"][take], device=device),
            torch.as_tensor(seqs, device=device),
            torch.as_tensor(pos, device=device),
            torch.as_tensor(neg, device=device),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        batches += 1
    return loss_sum, batches


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def evaluate_cf_and_baselines(model, data, seed: int, max_len: int) -> dict:
    """Validation and test metrics of the model, popularity and random, same candidates."""
    scorers = {
        "model": model_scorer(model),
        "popularity": popularity_scorer(data),
        "random": random_scorer(seed),
    }
    out: dict[str, dict] = {}
    for name, scorer in scorers.items():
        row = {}
        for split in ("valid", "test"):
            for protocol in (SASREC_PROTOCOL, ALLMREC_PROTOCOL):
                m = evaluate(scorer, data, split, protocol, seed, max_len=max_len)
                row.update({f"{split}_{protocol.name}_{k}": v for k, v in m.items()})
        out[name] = row
    return out
