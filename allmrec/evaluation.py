"""One evaluator for every model: sampled-candidate ranking metrics, seeded.

Two protocols over the leave-one-out split:
- the SASRec paper's: the held-out item + 100 negatives, HR@10 and NDCG@10;
- A-LLMRec's: the held-out item + 19 negatives (20 candidates), Hit@1 (plus Hit@3/5, NDCG@5/10,
  which a ranking gives and pure generation cannot).

Negatives are drawn from items the user never interacted with (any split), by a generator
seeded with (seed, user, number of negatives): every model, baseline and run sees the same
candidates for a user, whatever subset or order of users it is evaluated on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from allmrec.data.prepared import PreparedData

# scores[b, c] of candidates[b, c] for users[b] whose histories are seqs[b] (left-padded)
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Protocol:
    name: str
    num_negatives: int
    ks: tuple[int, ...]


SASREC_PROTOCOL = Protocol("100neg", 100, (1, 5, 10))
ALLMREC_PROTOCOL = Protocol("19neg", 19, (1, 3, 5, 10))


def sample_candidates(
    data: PreparedData, users: np.ndarray, split: str, num_negatives: int, seed: int
) -> np.ndarray:
    """[U, 1 + n] item ids: the held-out item of `split` first, then n sampled negatives."""
    target = data.targets(split)
    out = np.zeros((len(users), 1 + num_negatives), dtype=np.int64)
    for row, user in enumerate(users):
        rng = np.random.default_rng([seed, int(user), num_negatives])
        seen = data.interacted(int(user))
        if data.num_items - len(np.unique(seen)) < num_negatives:
            raise ValueError(
                f"user {user} has interacted with all but "
                f"{data.num_items - len(np.unique(seen))} items; cannot sample {num_negatives}"
            )
        negatives: list[int] = []
        chosen: set[int] = set(seen.tolist())
        while len(negatives) < num_negatives:
            for item in rng.integers(1, data.num_items + 1, size=2 * num_negatives).tolist():
                if item not in chosen:
                    chosen.add(item)
                    negatives.append(item)
                    if len(negatives) == num_negatives:
                        break
        out[row, 0] = target[user]
        out[row, 1:] = negatives
    return out


def ranks_of_true(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """0-based rank of column 0 among each row's candidates; ties broken at random, seeded.

    Ties matter for baselines (popularity gives many equal scores): counting them all as
    wins or all as losses would flatter or punish a model, a random place among them doesn't.
    """
    true = scores[:, :1]
    greater = (scores[:, 1:] > true).sum(axis=1)
    equal = (scores[:, 1:] == true).sum(axis=1)
    rng = np.random.default_rng(seed)
    return greater + np.floor(rng.random(len(scores)) * (equal + 1)).astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...], prefix: str = "") -> dict:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"{prefix}hit@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        if k > 1:
            ndcg = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
            out[f"{prefix}ndcg@{k}"] = float(ndcg.mean()) if len(ranks) else 0.0
    out[f"{prefix}users"] = int(len(ranks))
    return out


def evaluate(
    scorer: Scorer,
    data: PreparedData,
    split: str,
    protocol: Protocol,
    seed: int,
    max_len: int = 50,
    users: np.ndarray | None = None,
    batch_size: int = 256,
    prefix: str = "",
) -> dict:
    """Rank each user's candidates with `scorer`; metrics over `users` (default: all)."""
    from allmrec.sequences import left_pad

    users = data.eval_users(split) if users is None else np.asarray(users)
    ranks = []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        candidates = sample_candidates(data, batch, split, protocol.num_negatives, seed)
        seqs = left_pad([data.history(int(u), split) for u in batch], max_len)
        scores = np.asarray(scorer(batch, seqs, candidates), dtype=np.float64)
        ranks.append(ranks_of_true(scores, seed=seed + start))
    return metrics_from_ranks(
        np.concatenate(ranks) if ranks else np.zeros(0, np.int64), protocol.ks, prefix
    )


def popularity_scorer(data: PreparedData) -> Scorer:
    counts = data.item_train_counts.astype(np.float64)
    return lambda users, seqs, candidates: counts[candidates]


def random_scorer(seed: int) -> Scorer:
    rng = np.random.default_rng(seed)
    return lambda users, seqs, candidates: rng.random(candidates.shape)


def model_scorer(model, device: str = "cpu") -> Scorer:
    """A CF backbone as a scorer (eval mode, no gradients)."""
    import torch

    def score(users: np.ndarray, seqs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = model.score(
                torch.as_tensor(users, device=device),
                torch.as_tensor(seqs, device=device),
                torch.as_tensor(candidates, device=device),
            )
        return out.float().cpu().numpy()

    return score
