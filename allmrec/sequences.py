"""Training batches for the CF backbones: padded sequences and sampled negatives.

As the public SASRec port: a user's training items i_1..i_n give the input i_1..i_{n-1}
(last `max_len` of them, left-padded with 0) and the positives i_2..i_n; each position gets one
negative sampled uniformly from the items the user never interacted with in training.
"""

from __future__ import annotations

import numpy as np


def left_pad(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """[B, max_len] int64, the most recent `max_len` items right-aligned, 0 before them."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        seq = seq[-max_len:]
        if len(seq):
            out[row, max_len - len(seq) :] = seq
    return out


def sample_negatives(
    pos: np.ndarray, seen: list[np.ndarray], num_items: int, rng: np.random.Generator
) -> np.ndarray:
    """One item per non-zero entry of `pos` [B, L], never one of that row's `seen` items."""
    neg = rng.integers(1, num_items + 1, size=pos.shape)
    for row, items in enumerate(seen):
        clash = np.isin(neg[row], items)
        while clash.any():  # rejection sampling; users see a small share of the catalogue
            neg[row, clash] = rng.integers(1, num_items + 1, size=int(clash.sum()))
            clash = np.isin(neg[row], items)
    neg[pos == 0] = 0
    return neg


def training_batch(
    train_items: list[np.ndarray], max_len: int, num_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seqs, pos, neg), each [B, max_len], from users' chronological training items."""
    seqs = left_pad([items[:-1] for items in train_items], max_len)
    pos = left_pad([items[1:] for items in train_items], max_len)
    neg = sample_negatives(pos, train_items, num_items, rng)
    return seqs, pos, neg
