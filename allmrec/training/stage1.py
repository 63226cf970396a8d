"""Stage 1 training pieces that know nothing of Ray or DeepSpeed.

Data as the reference code: one training example per user and epoch, the last position of the
user's training sequence: x_u from the frozen CF model over train[:-1], the positive train[-1],
one negative sampled from items the user has not trained on.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from allmrec.config import Config
from allmrec.data.prepared import PreparedData
from allmrec.evaluation import ALLMREC_PROTOCOL, evaluate
from allmrec.models.alignment import CollabTextAligner, set_text_encoder_trainable
from allmrec.sequences import left_pad, sample_negatives
from allmrec.text_encoder import folder_digest, load_sentence_encoder, local_model_dir


@dataclass
class FrozenCF:
    """What Stage 1 takes from the frozen CF backbone, computed once."""

    item_table: torch.Tensor  # E [num_items + 1, d_cf]
    x_train: torch.Tensor  # x_u over train[:-1] (the training input) [num_users + 1, d_cf]
    x_valid: torch.Tensor  # x_u over all train items (predicting the validation item)


@torch.no_grad()
def frozen_cf_inputs(cf_model, data: PreparedData, max_len: int, batch_size: int = 512) -> FrozenCF:
    cf_model.eval()
    users = np.arange(data.num_users + 1)

    def reps(histories: list[np.ndarray]) -> torch.Tensor:
        out = []
        for start in range(0, len(users), batch_size):
            batch = users[start : start + batch_size]
            seqs = left_pad([histories[u] for u in batch], max_len)
            out.append(cf_model.user_representation(torch.as_tensor(batch), torch.as_tensor(seqs)))
        return torch.cat(out).float()

    x_train = reps([t[:-1] for t in data.train])
    x_valid = reps(data.train)
    return FrozenCF(cf_model.item_embeddings().detach().float().clone(), x_train, x_valid)


def item_texts(data: PreparedData) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Q_i by item id (index 0 is padding), the no-interaction mask, the cold-label mask."""
    items = pq.read_table(
        data.directory / "items.parquet", columns=["item_idx", "text", "num_train", "is_cold"]
    )
    texts = [""] * (data.num_items + 1)
    no_train = np.zeros(data.num_items + 1, dtype=bool)
    cold = np.zeros(data.num_items + 1, dtype=bool)
    for idx, text, n, is_cold in zip(
        *(items.column(c).to_pylist() for c in items.column_names), strict=True
    ):
        texts[idx] = text
        no_train[idx] = n == 0
        cold[idx] = is_cold
    return texts, no_train, cold


def stage1_batch(
    users: np.ndarray,
    data: PreparedData,
    frozen: FrozenCF,
    texts: list[str],
    rng: np.random.Generator,
) -> dict:
    """x_u, e_pos, e_neg and the positive/negative item texts for `users`."""
    pos = np.array([data.train[u][-1] for u in users])
    neg = sample_negatives(pos[:, None], [data.train[u] for u in users], data.num_items, rng)[:, 0]
    return {
        "pos": pos,
        "neg": neg,
        "x_u": frozen.x_train[users],
        "e_pos": frozen.item_table[pos],
        "e_neg": frozen.item_table[neg],
        "pos_texts": [texts[i] for i in pos],
        "neg_texts": [texts[i] for i in neg],
    }


def to_device(features: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


TEXT_BATCH_SIZE = 128  # texts a forward pass of `encode_texts`


@torch.no_grad()
def encode_texts(
    text_encoder: torch.nn.Module,
    texts: list[str],
    device,
    batch_size: int = TEXT_BATCH_SIZE,
    max_tokens: int = 128,
) -> torch.Tensor:
    """q_i of every text with the (current, fine-tuned) Sentence-BERT, eval mode."""
    was_training = text_encoder.training
    text_encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        features = tokenize(text_encoder, texts[start : start + batch_size], max_tokens)
        embedded = text_encoder(to_device(features, device))["sentence_embedding"]
        out.append(embedded.float().cpu())
    text_encoder.train(was_training)
    return torch.cat(out)


def encode_across_workers(
    encoder: torch.nn.Module, texts: list[str], device, max_tokens: int, rank: int, world: int
) -> torch.Tensor:
    """`encode_texts` of every text, in 1/world of the time: each worker encodes its own run
    of whole batches and gets the others' by an all-gather (collective). The batches are the
    ones a single pass makes, so the q_i are the same to the bit. A worker with fewer batches
    encodes the first batch again, unused: every worker makes as many forward passes through
    its engine (a fine-tuned encoder lives in the DeepSpeed engine, whose ZeRO-3 hooks run on
    every forward)."""
    if world == 1 or not dist.is_initialized():
        return encode_texts(encoder, texts, device, max_tokens=max_tokens)
    size = TEXT_BATCH_SIZE
    per_worker = math.ceil(math.ceil(len(texts) / size) / world)  # whole batches a worker
    start = min(rank * per_worker * size, len(texts))
    end = min(start + per_worker * size, len(texts))
    mine = []
    if end > start:
        mine.append(encode_texts(encoder, texts[start:end], device, max_tokens=max_tokens))
    for _ in range(per_worker - math.ceil((end - start) / size)):  # unused: kept as 0 rows
        mine.append(encode_texts(encoder, texts[:size], device, max_tokens=max_tokens)[:0])
    block = torch.cat(mine)
    padded = torch.zeros(per_worker * size, block.shape[1], dtype=block.dtype, device=device)
    padded[: len(block)] = block.to(device)
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    return torch.cat(blocks).cpu()[: len(texts)]


def frozen_text_encodings(
    text_encoder: torch.nn.Module,
    texts: list[str],
    device,
    max_tokens: int,
    cache: Path | None,
) -> torch.Tensor:
    """`encode_texts` of a frozen text encoder, computed once per machine and kept under
    `cache`: every later Stage 1 run and Tune trial over the same texts reads it instead of
    encoding every item again (~10 s a run on 2 cores). The key is the encoder's weights, the
    texts, the token limit, the device and the thread count: what is read is exactly what the
    call would compute. `cache=None` computes without keeping."""
    if cache is None:
        return encode_texts(text_encoder, texts, device, max_tokens=max_tokens)
    weights = hashlib.sha256()
    for name, tensor in text_encoder.state_dict().items():
        # raw bytes of any dtype (numpy has no bfloat16, the GPU profile's)
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        weights.update(f"{name}|{tensor.dtype}".encode())
        weights.update(raw.numpy().tobytes())
    return _kept_encodings(
        f"weights:{weights.hexdigest()}",
        lambda: encode_texts(text_encoder, texts, device, max_tokens=max_tokens),
        texts,
        device,
        max_tokens,
        cache,
    )


def frozen_text_encodings_of(
    name: str,
    texts: list[str],
    device,
    max_tokens: int,
    cache: Path | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`frozen_text_encodings` of the encoder `name` (`data.text_encoder`) run in `dtype`, read
    from `cache` without loading the encoder when they are kept there: a Stage 1 worker then
    never imports sentence-transformers (~4 s a process on 2 cores). The key stands for the
    weights by the files of the model's folder; a name only a hub resolves is loaded and keyed
    by its weights."""

    def loaded() -> torch.nn.Module:
        return load_sentence_encoder(name, device=str(device)).to(dtype)

    folder = local_model_dir(name)
    if folder is None or cache is None:
        return frozen_text_encodings(loaded(), texts, device, max_tokens, cache)
    return _kept_encodings(
        f"folder:{folder_digest(folder)}|{dtype}",
        lambda: encode_texts(loaded(), texts, device, max_tokens=max_tokens),
        texts,
        device,
        max_tokens,
        cache,
    )


def _kept_encodings(
    encoder_key: str, compute, texts: list[str], device, max_tokens: int, cache: Path
) -> torch.Tensor:
    """The q_i kept under `cache` for this encoder, texts, token limit, device and thread
    count, or `compute()`d and kept (written whole: concurrent trials, one wins)."""
    digest = hashlib.sha256(encoder_key.encode())
    digest.update(f"{max_tokens}|{torch.device(device).type}|{torch.get_num_threads()}".encode())
    digest.update("\x00".join(texts).encode())
    path = Path(cache) / f"{digest.hexdigest()[:32]}.safetensors"
    if path.is_file():
        return load_file(str(path))["q"]
    q = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name no other writer has, also on another host sharing this cache (an NFS home)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".partial")
    os.close(handle)
    save_file({"q": q.contiguous()}, partial)
    os.replace(partial, path)
    return q


def tokenize(encoder, texts: list[str], max_tokens: int) -> dict:
    features = encoder.preprocess(texts)
    if features["input_ids"].shape[1] > max_tokens:  # long descriptions: keep the title end
        features = {
            k: v[:, :max_tokens] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
            for k, v in features.items()
        }
    return features


@torch.no_grad()
def joint_embeddings(
    aligner: CollabTextAligner, frozen: FrozenCF, q: torch.Tensor, text_only: np.ndarray
) -> torch.Tensor:
    """z_i of every item; `text_only` items (no interactions) take enc_T(q_i)."""
    return aligner.joint_item_embeddings(frozen.item_table, q, torch.as_tensor(text_only))


@torch.no_grad()
def stage1_quality(
    aligner: CollabTextAligner,
    frozen: FrozenCF,
    q: torch.Tensor,
    data: PreparedData,
    cold_label: np.ndarray,
    seed: int,
    users: np.ndarray | None = None,
) -> dict:
    """Validation ranking by <x_u, dec_I(enc_I(e_i))> (`valid_hit@1`), the same with the
    cold-labelled items taking the text path dec_I(enc_T(q_i)) (`valid_coldtext_hit@1`, the
    search's default objective: the text path is what alpha and beta shape), and every item
    through the text path (`valid_text_hit@1`, the SBERT variant's)."""
    item_scores = aligner.item_ae.decoder(aligner.item_ae.encode(frozen.item_table))
    text_scores = aligner.item_ae.decoder(aligner.text_ae.encode(q))
    cold = torch.as_tensor(cold_label)[:, None]
    mixed = torch.where(cold, text_scores, item_scores)
    out = {}
    for name, table in (("", item_scores), ("coldtext_", mixed), ("text_", text_scores)):

        def scorer(batch_users, seqs, candidates, table=table):
            x = frozen.x_valid[torch.as_tensor(batch_users)]
            return (x[:, None, :] * table[torch.as_tensor(candidates)]).sum(-1).numpy()

        m = evaluate(scorer, data, "valid", ALLMREC_PROTOCOL, seed, users=users)
        out[f"valid_{name}hit@1"] = m["hit@1"]
        out[f"valid_{name}ndcg@10"] = m["ndcg@10"]
        out["valid_users"] = m["users"]
    return out


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """How spread the joint embeddings are: mean pairwise cosine and per-dimension variance.

    The paper's over-smoothing without reconstruction shows as cosine -> 1 and variance -> 0.
    """
    z = z.float()
    unit = torch.nn.functional.normalize(z, dim=1)
    n = len(z)
    cos = (unit @ unit.T).sum() - n
    centered = torch.nn.functional.normalize(z - z.mean(0), dim=1)
    ccos = (centered @ centered.T).sum() - n
    return {
        "mean_cosine": float(cos / (n * (n - 1))),
        "mean_centered_cosine": float(ccos / (n * (n - 1))),
        "mean_dim_variance": float(z.var(0).mean()),
    }


def build_aligner(
    config: Config, cf_dim: int, device: str = "cpu", text_dim: int | None = None
) -> CollabTextAligner:
    """The Sentence-BERT named by `data.text_encoder` and both autoencoders; given `text_dim`
    (the width of q_i computed beforehand, for a frozen encoder), the autoencoders only."""
    cfg = config.stage1
    text_encoder = None
    if text_dim is None:
        text_encoder = load_sentence_encoder(config.data.text_encoder, device=device)
        set_text_encoder_trainable(text_encoder, cfg.text_encoder_trainable)
        text_dim = int(text_encoder.get_embedding_dimension())
    return CollabTextAligner(text_encoder, cf_dim, text_dim, cfg.latent_dim)


def write_stage1_artifact(
    out: Path,
    aligner: CollabTextAligner,
    frozen,
    texts: list[str],
    no_train: np.ndarray,
    max_tokens: int,
    cache: Path | None = None,
) -> dict:
    """stage1/: autoencoders and text encoder as safetensors, z_i of every item as Parquet.

    `cache`: where a frozen encoder's q_i are kept (`frozen_text_encodings`); None (a trained
    encoder) encodes the texts anew."""
    save_file(
        {k: v.contiguous() for k, v in aligner.item_ae.state_dict().items()},
        str(out / "item_autoencoder.safetensors"),
    )
    save_file(
        {k: v.contiguous() for k, v in aligner.text_ae.state_dict().items()},
        str(out / "text_autoencoder.safetensors"),
    )
    aligner.text_encoder.save(str(out / "text_encoder"), safe_serialization=True)
    q = frozen_text_encodings(aligner.text_encoder, texts, "cpu", max_tokens, cache)
    z = joint_embeddings(aligner, frozen, q, no_train)
    with torch.no_grad():
        z_text = aligner.text_ae.encode(q.to(z.dtype))

    def column(values: torch.Tensor) -> pa.FixedSizeListArray:
        values = values[1:].float().contiguous()
        return pa.FixedSizeListArray.from_arrays(
            pa.array(values.reshape(-1).numpy(), pa.float32()), values.shape[1]
        )

    # z: the joint embedding (the item path, or the text path for items without
    # interactions); z_text: enc_T(q_i) of every item (the paper's A-LLMRec (SBERT)); q: the
    # Sentence-BERT encoding itself (the text-aware readout and the Text baseline read it).
    table = pa.table(
        {
            "item_idx": pa.array(np.arange(1, len(z), dtype=np.int32)),
            "z": column(z),
            "source": pa.array(np.where(no_train[1:], "text", "item")),
            "z_text": column(z_text),
            "q": column(q),
        }
    )
    pq.write_table(table, out / "joint_item_emb.parquet")
    return {
        "items": len(z) - 1,
        "text_path_items": int(no_train[1:].sum()),
        **collapse_stats(z[1:]),
    }
