"""A learned content path for the text-aware readout, against today's cosine, in one run.

Today the `user_item_text` readout's text path is cos(t, q_i): the unit mean of the history's
Sentence-BERT encodings against the candidate's. That cosine scores a rare item and a popular
one on the same scale, but it is weak (Hit@1 0.22 alone on ML-1M, SASRec 0.62), so the count
gate can only lift cold items by lifting all of them, and pays on warm ones
(`benchmarks/gate_frontier.py`). This trains, on a run's training transitions (every position
of every trained user's sequence, the previous 10 items as history), a content model that
sees no item id and no count:

    item:  f(i) = MLP(q_i, one-hot release-year bin, genre multi-hot)      (d = 64)
    user:  m = the recency-weighted mean of f over the history, u = m + MLP(m)
    score: <u, f(i)>, a softmax over the whole catalogue

and puts its score in the gate in place of the cosine (the gate's b_k learns its scale), then
sweeps the gate's cold-item weight for both text paths as `gate_frontier.py` does (validation
out of sample by halves, test on the evaluator's users paired against SASRec's ranks).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/content_path.py --run-dir runs/ml-1m

ML-1M: 881k transitions, about 35 s an epoch on 2 cores (4 epochs); ML-100K: 2 s an epoch.
An experiment over a kept run, no Ray; the library's readout does not have this path yet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from gate_frontier import (
    load_run,
    section_line,
    sweep_row,
    test_examples,
    top1_as_shown,
    validation_examples,
)
from torch import nn

from allmrec.llm_evaluation import cf_row

HISTORY = 10
YEAR_BINS = np.array([0, 1940, 1950, 1960, 1970, 1980, 1985, 1990, 1993, 1995, 1996, 1997, 1998])


def item_features(run_dir: Path, q: torch.Tensor, extras: bool) -> torch.Tensor:
    """[num_items + 1, d] (row 0 padding): the unit q_i, and with `extras` the release year's
    bin and the genres of the prepared item table (MiniLM barely reads the year)."""
    parts = [F.normalize(q[1:].float(), dim=-1)]
    if extras:
        items = pq.read_table(run_dir / "data" / "items.parquet").to_pandas()
        items = items.sort_values("item_idx")
        years = pd_years(items["release_year"]) if "release_year" in items else None
        if years is not None:
            bins = np.searchsorted(YEAR_BINS, years, side="right") - 1
            parts.append(F.one_hot(torch.as_tensor(bins), len(YEAR_BINS)).float())
        column = next((c for c in ("genre", "genres", "class") if c in items), None)
        if column is not None:
            words = items[column].fillna("").str.split()
            vocabulary = sorted({w for row in words for w in row})
            hot = torch.zeros(len(items), len(vocabulary))
            for row, genre_words in enumerate(words):
                hot[row, [vocabulary.index(w) for w in genre_words]] = 1
            parts.append(hot)
    features = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, features.shape[1]), features])


def pd_years(column) -> np.ndarray:
    """Four-digit years of a text column, 0 where none."""
    found = column.fillna("").astype(str).str.extract(r"(\d{4})")[0]
    return found.fillna("0").astype(int).to_numpy()


class ContentModel(nn.Module):
    """Scores items by their features alone, for a history of items (no ids, no counts)."""

    def __init__(self, features: torch.Tensor, dim: int = 64) -> None:
        super().__init__()
        self.register_buffer("features", features)
        self.item = nn.Sequential(nn.Linear(features.shape[1], 256), nn.GELU(), nn.Linear(256, dim))
        self.user = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.recency = nn.Parameter(torch.zeros(HISTORY))  # softmax: weights of the positions

    def item_vectors(self) -> torch.Tensor:
        return self.item(self.features)

    def user_vectors(self, histories: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """histories [B, HISTORY] left-padded with 0."""
        present = (histories > 0).float()
        weights = torch.softmax(self.recency, 0)[None, :] * present
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
        mean = (items[histories] * weights[..., None]).sum(1)
        return mean + self.user(mean)


def left_padded(history, length: int = HISTORY) -> list[int]:
    tail = [int(i) for i in history[-length:]]
    return [0] * (length - len(tail)) + tail


def train_content(model: ContentModel, data, epochs: int, seed: int) -> None:
    histories, targets = [], []
    for user in data.training_users():
        sequence = data.train[int(user)]
        for t in range(1, len(sequence)):
            histories.append(left_padded(sequence[:t]))
            targets.append(int(sequence[t]))
    histories, targets = torch.tensor(histories), torch.tensor(targets)
    print(f"content model: {len(targets)} training transitions", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(targets), generator=generator)
        total = 0.0
        for start in range(0, len(targets), 1024):
            batch = order[start : start + 1024]
            items = model.item_vectors()
            logits = model.user_vectors(histories[batch], items) @ items.T
            logits[:, 0] = float("-inf")  # padding is no item
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        print(
            f"  epoch {epoch}: loss {total / len(targets):.4f}, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )


@torch.no_grad()
def content_scores(model: ContentModel, histories, candidates: torch.Tensor) -> torch.Tensor:
    items = model.item_vectors()
    users = model.user_vectors(torch.tensor([left_padded(h) for h in histories]), items)
    return torch.einsum("bd,bcd->bc", users, items[candidates])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run evaluated")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--text-only", action="store_true", help="q_i alone, no year or genres")
    parser.add_argument("--weights", default="1,2,3,4,6,8")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, inputs, config, evaluated = load_run(args.run_dir)
    readout, data = model.readout, inputs.data

    content = ContentModel(item_features(args.run_dir, inputs.q, not args.text_only))
    train_content(content, data, args.epochs, args.seed)

    validation = validation_examples(readout, inputs, config)
    histories = [data.train[int(u)] for u in validation.users]
    v_content = content_scores(content, histories, validation.candidates)
    cases, records, test = test_examples(args.run_dir, readout, inputs, evaluated)
    t_content = content_scores(content, [c.history for c in cases], test.candidates)
    cf_hits = np.array([r["ranks"][cf_row(inputs)] == 0 for r in records])
    print(
        f"test, {cf_row(inputs)} (all / cold / warm): {section_line(cf_hits, test.cold, test.warm)}"
    )
    for name, scores in (("cosine", test.cosine), ("content model", t_content)):
        alone = section_line(top1_as_shown(scores, cases), test.cold, test.warm)
        print(f"test, the {name} alone: {alone}")

    # on the cosine's scale, so the gate's start and ridge mean the same for both paths
    scale = float(v_content.std() / validation.cosine.std())
    paths = {
        "cosine": (validation.cosine, test.cosine),
        "content": (v_content / scale, t_content / scale),
    }
    halves = np.random.default_rng(args.seed).permutation(len(validation.users))
    halves = halves < len(validation.users) // 2
    print(
        "\n| text path | cold weight | validation all / cold / warm | test all / cold / warm "
        "| all - CF | cold - CF | warm - CF | cold / CF |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (v_text, t_text) in paths.items():
        for weight in [float(w) for w in args.weights.split(",")]:
            cells = sweep_row(
                readout,
                weight,
                validation,
                v_text,
                test,
                t_text,
                cases,
                cf_hits,
                halves,
                evaluated.seed,
            )
            print(f"| {name} | {weight:g} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
