"""The content path of the text-aware readout: items and users from item text (and counts).

The `user_item_text` readout scores each item by its CF path and a text path, weighted by how
often the item was seen in training (`allmrec.models.readout.CountGate`). Its first text path,
`cosine`, is cos(mean of the history's q_j, q_i) over Sentence-BERT encodings: it scores a rare
and a popular item on one scale, but it is weak (Hit@1 0.22 alone on ML-1M, SASRec 0.62), so
the gate can lift cold items only by lifting all of them, and pays on warm ones
(docs/results.md, "the cold-item weight"). The `content` path learns to read the same q:

    item:   f(i) = MLP(unit [unit q_i, onehot(k_i)])                          [d]
    user:   m = sum_j w_j f(h_j) over the last `window` history items, w = softmax(r) by
            position from the most recent (absent positions left out), c_u = m + MLP(m)
    score:  <c_u, f(i)>

k_i is the bucket of the item's training interactions (`count_bucket`; `stage2.content_counts`,
off by default; without it f reads q_i alone). It sees no item id, so an item never seen in
training (or added at serving time, bucket 0) is scored like any other, from its text; the
history's buckets tell the user side how far this user strays from the head of the catalogue
(measured on ML-100K's 849 test users, offline: cold items 1.65x SASRec at the gate's weight 6
with the buckets, 1.40x without, every other section level or above; but the weight `auto`
chooses on validation then falls, and `make demo` scored lower: docs/results.md).

It is trained once, at Stage 2's start (before the gate is fitted), by a softmax over the whole
catalogue on every transition of the training users' sequences (`fit_content_tower`), and
frozen after: the LLM's correction to the user side, T(h), and the gate learn around it.
Measured offline first (`benchmarks/content_path.py`): on ML-1M it scores 0.6187 alone after
16 epochs with year and genre features (SASRec 0.6160), and in the gate it moves the
cold/warm frontier out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


# Buckets of an item's training interactions n: 0, 1, 2-3, 4-7, ..., the last one >= 2^10. The
# readout's gate weighs its paths by the same buckets.
COUNT_BUCKETS = 12


def count_bucket(counts: Tensor, buckets: int = COUNT_BUCKETS) -> Tensor:
    """The bucket of each count: 0 for none, else 1 + floor(log2 n), at most `buckets` - 1."""
    n = counts.float().clamp_min(0)
    bucket = torch.where(n > 0, 1 + torch.floor(torch.log2(n.clamp_min(1))), torch.zeros_like(n))
    return bucket.long().clamp_max(buckets - 1)


def present_rows(history: Tensor) -> Tensor:
    """Which rows of a right-aligned history [B, H, d] hold an item (the others are zero
    padding), [B, H] bool."""
    return history.abs().sum(-1) > 0


class UserTower(nn.Module):
    """c_u from the f of a user's history: the recency-weighted mean and an MLP of it."""

    def __init__(self, dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.recency = nn.Parameter(torch.zeros(window))  # r: softmax gives w by position
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, history: Tensor, present: Tensor) -> Tensor:
        """history [B, H, d] right-aligned (the most recent last), present [B, H] bool."""
        n = min(history.shape[1], self.window)
        history, present = history[:, history.shape[1] - n :], present[:, present.shape[1] - n :]
        weights = torch.softmax(self.recency, 0)[self.window - n :] * present.to(history.dtype)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
        mean = torch.einsum("bh,bhd->bd", weights, history)
        return mean + self.mlp(mean)


class ContentTower(nn.Module):
    """f(i) and c_u from Sentence-BERT encodings q and, with `counts`, the items' count
    buckets (the module docstring)."""

    def __init__(
        self, d_text: int, dim: int = 64, window: int = 10, hidden: int = 256, counts: bool = False
    ) -> None:
        super().__init__()
        # saved with the weights, so that a stack says whether its f reads the buckets
        self.register_buffer("count_buckets", torch.tensor(COUNT_BUCKETS if counts else 0))
        self.item_tower = nn.Sequential(
            nn.Linear(d_text + int(self.count_buckets), hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.user_tower = UserTower(dim, window)

    @property
    def dim(self) -> int:
        return self.item_tower[-1].out_features

    @staticmethod
    def completed(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """`state` with `count_buckets` 0 where a tower's weights lack it: a tower saved
        before it could read counts read q alone, and scores as it did."""
        key = f"{prefix}count_buckets"
        if f"{prefix}item_tower.0.weight" not in state or key in state:
            return state
        return state | {key: torch.tensor(0)}

    @property
    def reads_counts(self) -> bool:
        return bool(self.count_buckets)

    def features(self, q: Tensor, counts: Tensor | None = None) -> Tensor:
        """What f reads of items' q [..., d_text] (and counts [...]): the unit q_i, and the
        one-hot of the count's bucket beside it, the whole made unit."""
        weight = self.item_tower[0].weight
        x = F.normalize(q.to(weight.dtype), dim=-1)
        if not self.reads_counts:
            return x
        if counts is None:
            raise ValueError("this content path reads the items' training interactions: pass them")
        buckets = count_bucket(counts.to(x.device), int(self.count_buckets))
        hot = F.one_hot(buckets, int(self.count_buckets)).to(x.dtype)
        return F.normalize(torch.cat([x, hot], dim=-1), dim=-1)

    def items(self, q: Tensor, counts: Tensor | None = None) -> Tensor:
        """f(i) of items' q [..., d_text] (and their training interactions [...]) -> [..., d]."""
        return self.item_tower(self.features(q, counts))

    def users(self, history_q: Tensor, history_counts: Tensor | None = None) -> Tensor:
        """c_u [B, d] from the history's q [B, H, d_text] (and counts [B, H]), right-aligned,
        zero rows absent."""
        items = self.items(history_q, history_counts)
        return self.user_tower(items, present_rows(history_q))


def transitions(sequences: Sequence[np.ndarray], window: int) -> tuple[Tensor, Tensor]:
    """(histories [T, window] of item ids left-padded with 0, targets [T]): every position
    after the first of every sequence, the `window` items before it as its history."""
    histories, targets = [], []
    for sequence in sequences:
        sequence = np.asarray(sequence, dtype=np.int64)
        for t in range(1, len(sequence)):
            tail = sequence[max(0, t - window) : t]
            histories.append(np.concatenate([np.zeros(window - len(tail), np.int64), tail]))
            targets.append(sequence[t])
    if not targets:
        raise ValueError("the content path needs training sequences of at least 2 items")
    return torch.as_tensor(np.stack(histories)), torch.as_tensor(np.array(targets))


@torch.enable_grad()  # a caller's no_grad (the readouts' start is fitted under one) stops here
def fit_content_tower(
    tower: ContentTower,
    q: Tensor,
    sequences: Sequence[np.ndarray],
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 1024,
    seed: int = 0,
    popularity: Tensor | None = None,
    counts: Tensor | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """Train `tower` on `sequences` of item ids (1..N; q [N + 1, d_text], row 0 padding): for
    each transition a softmax of <c_u, f(i)> over the whole catalogue, its cross-entropy on
    the true next item. `popularity` [N + 1] (training interactions): the softmax's logits
    are <c_u, f(i)> + log(1 + n_i) (a logQ correction), so that <c_u, f(i)> learns the user's
    taste apart from how often the item is seen, which the readout's gate weighs by count
    anyway. `counts` [N + 1]: the items' training interactions, for a tower that reads their
    buckets. `progress(epoch, epochs, loss)` is called after each epoch. Returns the last
    epoch's loss, the transitions and the seconds."""
    histories, targets = transitions(sequences, tower.user_tower.window)
    prior = None if popularity is None else torch.log1p(popularity.float().clamp_min(0))
    q = q.float()
    optimizer = torch.optim.Adam(list(tower.parameters()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    frozen = [p for p in tower.parameters() if not p.requires_grad]
    tower.requires_grad_(True)  # a readout holds its tower frozen: trained here only
    tower.train()
    features = tower.features(q, counts)  # fixed inputs: only the MLP above them trains
    loss_sum = 0.0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(targets), generator=generator)
        loss_sum = 0.0
        for start in range(0, len(targets), batch_size):
            batch = order[start : start + batch_size]
            items = tower.item_tower(features)  # every item's f: the softmax runs over them all
            ids = histories[batch]
            users = tower.user_tower(items[ids], ids > 0)
            logits = users @ items.T
            if prior is not None:
                logits = logits + prior
            logits[:, 0] = float("-inf")  # row 0 is padding, no item
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(batch)
        log.info(
            "content path: epoch %d/%d, loss %.4f, %.0f s",
            epoch,
            epochs,
            loss_sum / len(targets),
            time.perf_counter() - started,
        )
        if progress is not None:
            progress(epoch, epochs, loss_sum / len(targets))
    tower.eval()
    for p in frozen:
        p.requires_grad_(False)
    return {
        "content_loss": loss_sum / len(targets),
        "content_transitions": len(targets),
        "content_seconds": time.perf_counter() - started,
    }
