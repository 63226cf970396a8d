"""The content path of the text-aware readout against the cosine path, in one run.

The `user_item_text` readout's first text path is cos(t, q_i): the unit mean of the history's
Sentence-BERT encodings against the candidate's. It scores a rare item and a popular one on
the same scale, but it is weak (Hit@1 0.22 alone on ML-1M, SASRec 0.62), so the count gate can
only lift cold items by lifting all of them, and pays on warm ones (`gate_frontier.py`). The
library's content path (`allmrec.models.content`, `stage2.text_path: content`) trains, on a
run's training transitions, a model that sees no item id and no count:

    item:  f(i) = MLP(features of i)                                        (d = 64)
    user:  m = the recency-weighted mean of f over the last 10 history items, c_u = m + MLP(m)
    score: <c_u, f(i)>, a softmax over the whole catalogue

This benchmark trains that tower over a kept run (no Ray, no LLM), puts its score in the gate
beside the run's own text path (the row "stack": the cosine path for a run saved before the
content path, else the run's content path), and sweeps the gate's cold-item weight for both
as `gate_frontier.py` does (validation out of sample by halves, full histories only, test on
the evaluator's users paired against SASRec's ranks). The features are q_i with `--text-only`
(the library's), and by default q_i with the release year's bin and the genres of the item
table; `--counts` adds the bucket of the item's training interactions (the library's
`stage2.content_counts`); `--logq` trains with log(1 + n_i) added to the logits;
`--attentive` adds a self-attention layer over the history's f to the user side.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/content_path.py --run-dir runs/ml-1m

ML-1M: 881k transitions, about 40 s an epoch on 2 cores; ML-100K: 2 s an epoch.
"""

from __future__ import annotations

import argparse
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
    top1,
    top1_as_shown,
    validation_examples,
)

from allmrec.llm_evaluation import cf_row
from allmrec.models.content import ContentTower, UserTower, fit_content_tower
from allmrec.training.stage2 import shown_history

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


class LengthScaledUser(UserTower):
    """The user side with a learned scale per history length: c_u * exp(s_n), n the items
    present, so that the softmax's sharpness (and the gate's text weight after it) follows
    how much a history of that length says."""

    def __init__(self, dim: int, window: int) -> None:
        super().__init__(dim, window)
        self.length_scale = torch.nn.Parameter(torch.zeros(window + 1))

    def forward(self, history: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        n = present[:, -self.window :].sum(1).clamp_max(self.window)
        return super().forward(history, present) * self.length_scale[n].exp()[:, None]


class AttentiveUser(UserTower):
    """The user side with one self-attention layer over the history's f (learned positions),
    read at the most recent item and added to the recency-weighted mean's c_u: a sequence
    model over the items' text, where the mean treats the history as a bag."""

    def __init__(self, dim: int, window: int, heads: int = 2) -> None:
        super().__init__(dim, window)
        self.positions = torch.nn.Parameter(torch.zeros(window, dim))
        self.attention = torch.nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.out = torch.nn.Linear(dim, dim)
        torch.nn.init.zeros_(self.out.weight)  # starts as the mean's c_u
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, history: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        base = super().forward(history, present)
        n = min(history.shape[1], self.window)
        tail, shown = history[:, -n:], present[:, -n:]
        # a row with no history attends to everything (zeros) rather than to nothing (NaN)
        padding = ~shown & shown.any(1, keepdim=True)
        states = self.attention(tail + self.positions[-n:], src_key_padding_mask=padding)
        return base + self.out(states[:, -1])


def content_scores(tower: ContentTower, features, counts, histories, candidates):
    """<c_u, f(i)> of each row's candidates [B, C], c_u over the history's last items (the
    items' training interactions read where the tower reads them)."""
    ids = [np.asarray(h[-HISTORY:], dtype=np.int64) for h in histories]
    history, history_counts = shown_history(features, counts, ids)
    with torch.no_grad():
        users = tower.users(history, history_counts)
        keys = tower.items(features[candidates], counts[candidates])
        return torch.einsum("bd,bcd->bc", users, keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run evaluated")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--text-only", action="store_true", help="q_i alone, no year or genres")
    parser.add_argument(
        "--logq", action="store_true", help="train with log(1 + n_i) added to the logits"
    )
    parser.add_argument(
        "--length-scale", action="store_true", help="a learned scale per history length"
    )
    parser.add_argument(
        "--attentive", action="store_true", help="a self-attention layer over the history's f"
    )
    parser.add_argument(
        "--counts",
        action="store_true",
        help="the item's count bucket among its features (the library's stage2.content_counts)",
    )
    parser.add_argument(
        "--cold-users", action="store_true", help="test on the held-out cold users instead"
    )
    parser.add_argument("--weights", default="1,2,3,4,6,8")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, inputs, config, evaluated = load_run(args.run_dir)
    readout, data = model.readout, inputs.data

    features = item_features(args.run_dir, inputs.q, not args.text_only)
    content = ContentTower(features.shape[1], window=HISTORY, counts=args.counts)
    if args.length_scale:
        content.user_tower = LengthScaledUser(content.dim, HISTORY)
    if args.attentive:
        content.user_tower = AttentiveUser(content.dim, HISTORY)
    sequences = [data.train[int(u)] for u in data.training_users()]
    fitted = fit_content_tower(
        content,
        features,
        sequences,
        args.epochs,
        seed=args.seed,
        popularity=inputs.counts if args.logq else None,
        counts=inputs.counts,
    )
    print(
        f"content model: {fitted['content_transitions']} training transitions, "
        f"{args.epochs} epochs, loss {fitted['content_loss']:.4f}, "
        f"{fitted['content_seconds']:.0f} s",
        flush=True,
    )

    validation = validation_examples(readout, inputs, config, short=False)
    histories = [data.train[int(u)] for u in validation.users]
    v_content = content_scores(content, features, inputs.counts, histories, validation.candidates)
    cases, records, test = test_examples(
        args.run_dir, readout, inputs, evaluated, cold_users=args.cold_users
    )
    t_content = content_scores(
        content, features, inputs.counts, [c.history for c in cases], test.candidates
    )
    cf_hits = np.array([r["ranks"][cf_row(inputs)] == 0 for r in records])
    print(
        f"test, {cf_row(inputs)} (all / cold / warm): {section_line(cf_hits, test.cold, test.warm)}"
    )
    v_cf = section_line(top1(validation.cf), validation.cold, validation.warm)
    print(f"validation, the CF path alone (all / cold / warm): {v_cf}")
    for name, scores in (("stack's text path", test.text), ("content model", t_content)):
        alone = section_line(top1_as_shown(scores, cases), test.cold, test.warm)
        print(f"test, the {name} alone: {alone}")

    # on the cosine's scale, so the gate's start and ridge mean the same for both paths
    scale = float(v_content.std() / validation.text.std())
    paths = {
        "stack": (validation.text, test.text),
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
