"""The evaluation table of A-LLMRec: every model on the same 20 candidates per user.

For each evaluated user: the held-out item and 19 seeded negatives (`eval_cases`), and rows
- A-LLMRec (generation): the paper's protocol, greedy generation with `max_new_tokens`; a hit
  by the reference's rule (the true title, lowercased, contained in the output) and by exact
  match of the first title in the output after normalisation;
- A-LLMRec (likelihood): the 20 candidates ranked by the log-likelihood of their titles after
  the prompt: Hit@1/3/5, NDCG@5/10;
- the same two for the LLM alone (the same prompt, titles without embeddings);
- the CF backbone alone, popularity and random (Hit@1 0.05 expected), ranking the candidates.

Scenarios are subsets of the users: all, warm and cold true items, cold users; cross-domain
and few-shot sections come from other run directories (`allmrec.distributed.evaluate`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from allmrec.config import Config
from allmrec.evaluation import metrics_from_ranks, popularity_scorer, random_scorer
from allmrec.models.projection import ALLMRecLM, hit_contains, hit_exact
from allmrec.sequences import left_pad
from allmrec.training.stage2 import EvalCase, Stage2Inputs, eval_example

log = logging.getLogger(__name__)

ALLMREC = "A-LLMRec"
LLM_ONLY = "LLM-only"
GENERATION, LIKELIHOOD = "generation", "likelihood"
RANK_KS = (1, 3, 5, 10)


def _ranking_rows(inputs: Stage2Inputs, cases: Sequence[EvalCase], seed: int) -> dict:
    """Ranks of the true item (0-based) for the CF backbone, popularity and random."""
    from allmrec.evaluation import model_scorer, ranks_of_true

    users = np.array([c.user for c in cases])
    candidates = np.stack([c.candidates for c in cases])
    seqs = left_pad([c.history for c in cases], inputs.cf_model.config.max_len)
    backbone = inputs.cf_manifest.get("backbone", {}).get("name", "cf")
    scorers = {
        f"CF backbone ({backbone})": model_scorer(inputs.cf_model),
        "Popularity": popularity_scorer(inputs.data),
        "Random": random_scorer(seed),
    }
    return {
        name: ranks_of_true(np.asarray(scorer(users, seqs, candidates), np.float64), seed)
        for name, scorer in scorers.items()
    }


def evaluate_cases(
    model: ALLMRecLM,
    inputs: Stage2Inputs,
    cases: Sequence[EvalCase],
    config: Config,
    rows: Sequence[str] = (ALLMREC, LLM_ONLY),
    baselines: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """One record per case: the true item, its labels, each row's rank or generated text."""
    cfg = config.evaluate
    records = [
        {
            "user": c.user,
            "true_item": int(c.candidates[0]),
            "true_title": inputs.titles[int(c.candidates[0])],
            "candidates": [int(i) for i in c.candidates],
            "ranks": {},
            "generated": {},
        }
        for c in cases
    ]
    if baselines:
        for name, ranks in _ranking_rows(inputs, cases, config.seed).items():
            for record, rank in zip(records, ranks, strict=True):
                record["ranks"][name] = int(rank)
    done = 0
    for row in rows:
        with_embeddings = row == ALLMREC
        examples = [eval_example(c, inputs, config, with_embeddings) for c in cases]
        if cfg.ranking:
            for record, example in zip(records, examples, strict=True):
                titles = [inputs.titles[i] for i in example.prompt.candidate_items]
                result = model.rank_candidates(
                    example.prompt, example.user_vector, example.item_vectors, titles
                )
                record["ranks"][f"{row} ({LIKELIHOOD})"] = result.items.index(record["true_item"])
                done += 1
                if progress:
                    progress(done, len(cases) * len(rows) * (cfg.ranking + cfg.generation))
        if cfg.generation:
            size = cfg.generation_batch_size
            for start in range(0, len(examples), size):
                texts = model.generate(examples[start : start + size], cfg.max_new_tokens)
                for record, text in zip(records[start : start + size], texts, strict=True):
                    record["generated"][f"{row} ({GENERATION})"] = text
                done += len(texts)
                if progress:
                    progress(done, len(cases) * len(rows) * (cfg.ranking + cfg.generation))
    return records


def _row_order(row: str) -> tuple:
    """A-LLMRec first, then the CF backbone, the LLM alone, popularity, random."""
    for k, prefix in enumerate(ROW_PREFIXES):
        if row.startswith(prefix):
            return (k, GENERATION not in row, row)
    return (len(ROW_PREFIXES), row)


ROW_PREFIXES = (ALLMREC, "CF backbone", LLM_ONLY, "Popularity", "Random")


def summarize(records: Sequence[dict]) -> dict[str, dict]:
    """{row: metrics} over `records`: ranking rows Hit@k/NDCG@k, generation rows Hit@1 by
    both rules."""
    table: dict[str, dict] = {}
    if not records:
        return table
    for row in records[0]["ranks"]:
        ranks = np.array([r["ranks"][row] for r in records])
        table[row] = metrics_from_ranks(ranks, RANK_KS)
    for row in records[0]["generated"]:
        outputs = [(r["generated"][row], r["true_title"]) for r in records]
        table[row] = {
            "hit@1": float(np.mean([hit_contains(g, t) for g, t in outputs])),
            "hit@1_exact": float(np.mean([hit_exact(g, t) for g, t in outputs])),
            "users": len(outputs),
        }
    return {row: table[row] for row in sorted(table, key=_row_order)}


def label_records(records: list[dict], inputs: Stage2Inputs, cold_user_max_train: int | None):
    """Adds `cold_item` (the true item is labelled cold) and `cold_user` to each record."""
    import pyarrow.parquet as pq

    if cold_user_max_train is None:
        users = pq.read_table(
            inputs.data.directory / "users.parquet", columns=["user_idx", "is_cold"]
        )
        cold_users = set(
            np.asarray(users.column("user_idx"))[np.asarray(users.column("is_cold"))].tolist()
        )
    else:
        cold_users = {
            u
            for u in range(1, inputs.data.num_users + 1)
            if len(inputs.data.train[u]) <= cold_user_max_train
        }
    for record in records:
        record["cold_item"] = bool(inputs.cold_items[record["true_item"]])
        record["cold_user"] = record["user"] in cold_users
    return records


SCENARIOS: dict[str, Callable[[dict], bool]] = {
    "all users": lambda r: True,
    "warm items": lambda r: not r["cold_item"],
    "cold items": lambda r: r["cold_item"],
    "cold users": lambda r: r["cold_user"],
}


def scenario_tables(records: list[dict]) -> dict[str, dict]:
    return {name: summarize([r for r in records if keep(r)]) for name, keep in SCENARIOS.items()}


# ---------------------------------------------------------------------------------------------
# Writing the table.

COLUMNS = (
    ("hit@1", "Hit@1"),
    ("hit@1_exact", "Hit@1 exact"),
    ("hit@3", "Hit@3"),
    ("hit@5", "Hit@5"),
    ("ndcg@5", "NDCG@5"),
    ("ndcg@10", "NDCG@10"),
)


def markdown_tables(tables: dict[str, dict], title: str, notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes]
    for scenario, table in tables.items():
        users = max((m["users"] for m in table.values()), default=0)
        lines += ["", f"## {scenario} ({users} users)", ""]
        if not table:
            lines.append("no user in this scenario")
            continue
        lines.append("| model | " + " | ".join(c for _, c in COLUMNS) + " |")
        lines.append("|---|" + "---|" * len(COLUMNS))
        for row, m in table.items():
            cells = [f"{m[k]:.4f}" if k in m else "" for k, _ in COLUMNS]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_hit1(tables: dict[str, dict], path, title: str) -> None:
    """Grouped bars: Hit@1 of every row in every scenario (random's 0.05 as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s, t in tables.items() if t]
    rows = list(dict.fromkeys(r for s in scenarios for r in tables[s]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scenarios) + 2), 4.5))
    width = 0.8 / max(len(rows), 1)
    for k, row in enumerate(rows):
        values = [tables[s].get(row, {}).get("hit@1", np.nan) for s in scenarios]
        ax.bar(np.arange(len(scenarios)) + k * width, values, width, label=row)
    ax.axhline(0.05, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(scenarios)) + 0.4 - width / 2, scenarios)
    ax.set_ylabel("Hit@1 (20 candidates)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Progress:
    """Logs `done/total` at most every `every` seconds, with the rate."""

    def __init__(self, tag: str, every: float = 30.0) -> None:
        self.tag, self.every = tag, every
        self.started = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every or done == total:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            log.info("%s: %d/%d prompts (%.2f/s)", self.tag, done, total, rate)


def seeded_users(users: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).permutation(users)[:max_users])
    return users
