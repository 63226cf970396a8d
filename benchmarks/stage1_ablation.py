"""The paper's Stage 1 ablation, re-run by hand: defaults (alpha 0.5, beta 0.2) against no
reconstruction (alpha = beta = 0), on the same data, seed and epochs, in one run.

Per epoch and setting it prints the losses, the item reconstruction error over every item, the
spread of the joint embeddings z_i (mean pairwise cosine, centred cosine, per-dimension
variance), of the text path enc_T(q_i) and of the Sentence-BERT outputs q_i, and validation
Hit@1 / NDCG@10 (19 negatives). At the end: the ratios without / with reconstruction.

It needs a run directory with `data/` and `cf/` (e.g. after `make demo`). In process, no Ray.
With `--text-encoder all` (the paper's fine-tuned Sentence-BERT) an epoch takes 70 to 100 s
on this 2-core machine; `frozen` caches q_i and takes about a second.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/stage1_ablation.py \\
        --run-dir runs/ml-100k-cpu --text-encoder all --epochs 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from allmrec.data.prepared import load_prepared
from allmrec.models.alignment import CollabTextAligner, set_text_encoder_trainable
from allmrec.text_encoder import load_sentence_encoder
from allmrec.training.cf import load_cf_model
from allmrec.training.stage1 import (
    collapse_stats,
    encode_texts,
    frozen_cf_inputs,
    item_texts,
    joint_embeddings,
    stage1_batch,
    stage1_quality,
    tokenize,
)


def train(args, alpha: float, beta: float, data, frozen, texts, no_train, cold) -> dict:
    torch.manual_seed(args.seed)
    encoder = load_sentence_encoder(args.text_encoder_name)
    set_text_encoder_trainable(encoder, args.text_encoder)
    aligner = CollabTextAligner(encoder, frozen.item_table.shape[1], 384)
    groups = [{"params": [*aligner.item_ae.parameters(), *aligner.text_ae.parameters()]}]
    text_params = [p for p in encoder.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": args.text_lr})
    optimizer = torch.optim.Adam(groups, lr=args.lr, betas=(0.9, 0.98))
    q_cache = (
        encode_texts(aligner.text_encoder, texts, "cpu") if args.text_encoder == "frozen" else None
    )
    users = data.training_users()
    row = {}
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(users)
        aligner.train()
        for start in range(0, len(order), 32):
            batch = stage1_batch(order[start : start + 32], data, frozen, texts, rng)
            if q_cache is not None:
                q_pos, q_neg = q_cache[batch["pos"]], q_cache[batch["neg"]]
            else:
                q_pos = tokenize(encoder, batch["pos_texts"], 128)
                q_neg = tokenize(encoder, batch["neg_texts"], 128)
            losses = aligner.losses(
                batch["x_u"], batch["e_pos"], batch["e_neg"], q_pos, q_neg, alpha, beta
            )
            optimizer.zero_grad()
            losses.total.backward()
            optimizer.step()
        aligner.eval()
        q = q_cache if q_cache is not None else encode_texts(aligner.text_encoder, texts, "cpu")
        with torch.no_grad():
            e = frozen.item_table[1:]
            recon = torch.nn.functional.mse_loss(aligner.item_ae(e)[1], e).item()
            z = joint_embeddings(aligner, frozen, q, no_train)[1:]
            z_text = aligner.text_ae.encode(q[1:])
            quality = stage1_quality(aligner, frozen, q, data, cold, args.seed)
        row = {
            "alpha": alpha,
            "beta": beta,
            "epoch": epoch,
            "seconds": round(time.perf_counter() - started, 1),
            **{f"loss_{k}": round(v, 5) for k, v in losses.as_floats().items()},
            "item_recon_mse": recon,
            **{f"z_{k}": v for k, v in collapse_stats(z).items()},
            **{f"z_text_{k}": v for k, v in collapse_stats(z_text).items()},
            **{f"q_{k}": v for k, v in collapse_stats(q[1:]).items()},
            **{k: v for k, v in quality.items() if k != "valid_users"},
        }
        print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--text-encoder", default="frozen", help="frozen, all or last:N")
    parser.add_argument("--text-encoder-name", default="embedded:all-MiniLM-L6-v2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_prepared(args.run_dir)
    cf_model, _ = load_cf_model(args.run_dir, data)
    frozen = frozen_cf_inputs(cf_model, data, cf_model.config.max_len)
    texts, no_train, cold = item_texts(data)
    with_recon = train(args, 0.5, 0.2, data, frozen, texts, no_train, cold)
    without = train(args, 0.0, 0.0, data, frozen, texts, no_train, cold)
    for key in ("item_recon_mse", "z_mean_dim_variance", "z_mean_cosine", "valid_hit@1"):
        print(
            f"{key}: with reconstruction {with_recon[key]:.4f}, without {without[key]:.4f}, "
            f"ratio without / with = {without[key] / max(with_recon[key], 1e-12):.2f}"
        )


if __name__ == "__main__":
    main()
