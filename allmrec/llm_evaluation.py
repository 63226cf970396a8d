"""The evaluation table of A-LLMRec: every model on the same 20 candidates per user.

For each evaluated user: the held-out item and 19 seeded negatives (`eval_cases`), and rows
- for a stack trained with the `rank` objective: A-LLMRec (rank), the readout over the frozen
  LLM's hidden states, and A-LLMRec (rank, LLM bypassed), the same readout trained on
  F_U(x_u) and F_I(z_i) alone (the ablation that shows what the LLM adds);
- for one trained with the paper's `generate` objective: A-LLMRec (generation), greedy
  generation with `max_new_tokens`, a hit by the reference's rule (the true title, lowercased,
  contained in the output) and by exact match of the first title in the output after
  normalisation; A-LLMRec (likelihood), the 20 candidates ranked by the log-likelihood of
  their titles after the prompt: Hit@1/3/5, NDCG@5/10;
- the same two for the LLM alone (the same prompt, titles without embeddings), on a seeded
  subset of the users when `evaluate.llm_only_max_users` is set;
- the CF backbone alone, popularity and random (Hit@1 0.05 expected), ranking the candidates.

Rows that can score any item (the CF backbone, popularity, and the `user_item` readout) also
rank the whole catalogue (every item the user has not interacted with before the held-out
one): full-catalogue HR@10 and NDCG@10.

Scenarios are subsets of the users: all, warm and cold true items, cold users; cross-domain
and few-shot sections come from other run directories (`allmrec.distributed.evaluate`). In
each, the rank row's Hit@1 minus the CF backbone's and minus the bypass's, paired by user,
with a 95% bootstrap interval (`paired_differences`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from allmrec.config import Config
from allmrec.evaluation import metrics_from_ranks, random_scorer
from allmrec.models.projection import ALLMRecLM, hit_contains, hit_exact
from allmrec.models.readout import TextInputs
from allmrec.sequences import left_pad
from allmrec.training.stage2 import EvalCase, Stage2Inputs, eval_example

log = logging.getLogger(__name__)

ALLMREC = "A-LLMRec"
LLM_ONLY = "LLM-only"
GENERATION, LIKELIHOOD = "generation", "likelihood"
RANK_ROW = f"{ALLMREC} (rank)"
BYPASS_ROW = f"{ALLMREC} (rank, LLM bypassed)"
SBERT_ROW = f"{ALLMREC} (SBERT)"
TEXT_ROW = "Text (MiniLM)"
CF_PREFIX = "CF backbone"
RANK_KS = (1, 3, 5, 10)
CATALOGUE_KS = (10,)


def cf_row(inputs: Stage2Inputs) -> str:
    return f"{CF_PREFIX} ({inputs.cf_manifest.get('backbone', {}).get('name', 'cf')})"


def _ranking_rows(inputs: Stage2Inputs, cases: Sequence[EvalCase], seed: int) -> dict:
    """Ranks of the true item (0-based) for the CF backbone, popularity and random."""
    from allmrec.evaluation import model_scorer, ranks_of_true

    users = np.array([c.user for c in cases])
    candidates = np.stack([c.candidates for c in cases])
    seqs = left_pad([c.history for c in cases], inputs.cf_model.config.max_len)
    counts = inputs.counts.double().numpy()
    scorers = {
        cf_row(inputs): model_scorer(inputs.cf_model),
        "Popularity": lambda users, seqs, candidates: counts[candidates],
        "Random": random_scorer(seed),
    }
    ranks = {
        name: ranks_of_true(np.asarray(scorer(users, seqs, candidates), np.float64), seed)
        for name, scorer in scorers.items()
    }
    if inputs.q is not None:
        text = text_scores(inputs, [c.history for c in cases], candidates)
        ranks[TEXT_ROW] = ranks_of_true(text.double().numpy(), seed)
    return ranks


def text_profile(inputs: Stage2Inputs, histories: Sequence[np.ndarray], last: int = 10):
    """The `Text (MiniLM)` baseline's user: the mean of the unit q_i of the last `last`
    history items (zeros for an empty history), [U, d_text]."""
    q = torch.nn.functional.normalize(inputs.q, dim=-1)
    rows = [q[torch.as_tensor(np.asarray(h[-last:], dtype=np.int64))] for h in histories]
    return torch.stack([r.mean(0) if len(r) else torch.zeros(q.shape[1]) for r in rows])


def text_scores(inputs: Stage2Inputs, histories, candidates: np.ndarray) -> torch.Tensor:
    """`Text (MiniLM)`: the cosine of each candidate's Sentence-BERT encoding q_c to the
    mean of the last 10 history items' (no LLM, no CF model), [U, C]."""
    profile = torch.nn.functional.normalize(text_profile(inputs, histories), dim=-1)
    q = torch.nn.functional.normalize(inputs.q, dim=-1)
    return torch.einsum("ud,ucd->uc", profile, q[torch.as_tensor(candidates)])


def catalogue_rank(scores: np.ndarray, case: EvalCase, seed: int = 0) -> int:
    """0-based rank of the held-out item among every item of `scores` [num_items + 1] that the
    user has not interacted with before it (padding 0 and the history left out); ties broken
    at a random place, seeded by (seed, user), as `ranks_of_true` does among the candidates
    (popularity and items of identical text tie often)."""
    keep = np.ones(len(scores), dtype=bool)
    keep[0] = False
    keep[np.asarray(case.history, dtype=np.int64)] = False
    true = int(case.candidates[0])
    keep[true] = False
    rest = scores[keep]
    greater = int((rest > scores[true]).sum())
    equal = int((rest == scores[true]).sum())
    if not equal:
        return greater
    return greater + int(np.random.default_rng([seed, case.user]).integers(0, equal + 1))


def _catalogue_baselines(inputs: Stage2Inputs, cases: Sequence[EvalCase], chunk: int = 64):
    """Full-catalogue ranks of the true item for the CF backbone and popularity."""
    from allmrec.evaluation import model_scorer

    every_item = np.arange(inputs.data.num_items + 1)
    counts = inputs.counts.double().numpy()
    cf = model_scorer(inputs.cf_model)
    ranks = {cf_row(inputs): [], "Popularity": []}
    if inputs.q is not None:
        ranks[TEXT_ROW] = []
    for start in range(0, len(cases), chunk):
        part = cases[start : start + chunk]
        users = np.array([c.user for c in part])
        seqs = left_pad([c.history for c in part], inputs.cf_model.config.max_len)
        scores = np.asarray(cf(users, seqs, np.tile(every_item, (len(part), 1))), np.float64)
        text = None
        if inputs.q is not None:
            profile = torch.nn.functional.normalize(
                text_profile(inputs, [c.history for c in part]), dim=-1
            )
            text = (profile @ torch.nn.functional.normalize(inputs.q, dim=-1).T).double().numpy()
        for b, (case, row) in enumerate(zip(part, scores, strict=True)):
            ranks[cf_row(inputs)].append(catalogue_rank(row, case))
            ranks["Popularity"].append(catalogue_rank(counts, case))
            if text is not None:
                ranks[TEXT_ROW].append(catalogue_rank(text[b], case))
    return ranks


@torch.no_grad()
def _rank_rows(
    model: ALLMRecLM,
    inputs: Stage2Inputs,
    cases: Sequence[EvalCase],
    records: list[dict],
    config: Config,
    progress: Callable[[int, int], None] | None,
    sbert: bool = True,
) -> None:
    """The rank objective's rows: the readout and the bypass, batched (and, with `sbert`, the
    readout with every z_i = enc_T(q_i)); with the `user_item` readouts also their
    full-catalogue ranks (one forward pass gives both)."""
    size = config.evaluate.generation_batch_size
    catalogue = model.readout.scores_any_item
    # At Stage 2's start (kept by `keep: best`) the LLM's corrections are zero: the same
    # scores without the LLM pass, which is most of an evaluation's time
    run_llm = not model.readout.ignores_states
    if not run_llm:
        log.info(
            "the readout's LLM corrections are zero (Stage 2's start): its rows are scored "
            "without the LLM pass, the same scores"
        )
    device = model.device
    tables = {RANK_ROW: inputs.z}
    if sbert and inputs.z_text is not None:
        # the paper's A-LLMRec (SBERT): every item's joint embedding from its text alone,
        # z_i = enc_T(q_i), through the same trained stack (not retrained on it)
        tables[SBERT_ROW] = inputs.z_text
    q_all = None if inputs.q is None else (inputs.q.to(device), inputs.counts.to(device))
    for start in range(0, len(cases), size):
        part = list(range(start, min(start + size, len(cases))))
        for row, z in tables.items():
            examples = [eval_example(cases[i], inputs, config, z=z) for i in part]
            batch = model.collate(examples).to(device)
            scores, query = model.rank_forward(batch, run_llm=run_llm)
            rows = {row: scores}
            full = {}
            # the whole catalogue's text, with each prompt's history (the gate reads its length)
            everything = (
                None
                if q_all is None
                else TextInputs(batch.text.history, *q_all, batch.text.history_counts)
            )
            if catalogue:
                full[row] = model.readout.item_scores(query, z.to(device), everything)
            if row == RANK_ROW and model.bypass is not None:
                rows[BYPASS_ROW] = model.bypass(batch)
                if catalogue:
                    full[BYPASS_ROW] = model.bypass.readout.item_scores(
                        model.bypass.user_query(batch), z.to(device), everything
                    )
            for name, scores in rows.items():
                for b, i in enumerate(part):
                    order = torch.argsort(scores[b], descending=True, stable=True).tolist()
                    shown = examples[b].prompt.candidate_items
                    true = records[i]["true_item"]
                    records[i]["ranks"][name] = [shown[j] for j in order].index(true)
            for name, scores in full.items():
                scores = scores.cpu().double().numpy()
                for b, i in enumerate(part):
                    records[i]["catalogue_ranks"][name] = catalogue_rank(scores[b], cases[i])
        if progress:
            progress(part[-1] + 1, len(cases))


def _llm_rows(
    model: ALLMRecLM,
    inputs: Stage2Inputs,
    cases: Sequence[EvalCase],
    records: list[dict],
    config: Config,
    row: str,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Likelihood ranking and greedy generation through the LLM: the `generate` objective's
    rows (`row` A-LLMRec, with embeddings) and the LLM-only baseline (no embeddings)."""
    cfg = config.evaluate
    examples = [eval_example(c, inputs, config, with_embeddings=row == ALLMREC) for c in cases]
    total, done = len(cases) * (cfg.ranking + cfg.generation), 0
    if cfg.ranking:
        for record, example in zip(records, examples, strict=True):
            titles = [inputs.titles[i] for i in example.prompt.candidate_items]
            result = model.rank_candidates(
                example.prompt, example.user_vector, example.item_vectors, titles
            )
            record["ranks"][f"{row} ({LIKELIHOOD})"] = result.items.index(record["true_item"])
            done += 1
            if progress:
                progress(done, total)
    if cfg.generation:
        size = cfg.generation_batch_size
        for start in range(0, len(examples), size):
            texts = model.generate(examples[start : start + size], cfg.max_new_tokens)
            for record, text in zip(records[start : start + size], texts, strict=True):
                record["generated"][f"{row} ({GENERATION})"] = text
            done += len(texts)
            if progress:
                progress(done, total)


def evaluate_cases(
    model: ALLMRecLM,
    inputs: Stage2Inputs,
    cases: Sequence[EvalCase],
    config: Config,
    rows: Sequence[str] = (ALLMREC, LLM_ONLY),
    baselines: bool = True,
    progress: Callable[[int, int], None] | None = None,
    llm_only_users: set[int] | None = None,
    sbert: bool = True,
) -> list[dict]:
    """One record per case: the true item, its labels, each row's rank (among the candidates
    and, where the row can score any item, in the whole catalogue) or generated text.

    `rows`: ALLMREC (the rank or the generate objective's rows, by how `model` was trained)
    and LLM_ONLY (on the cases of `llm_only_users` only, when given).
    """
    records = [
        {
            "user": c.user,
            "true_item": int(c.candidates[0]),
            "true_title": inputs.titles[int(c.candidates[0])],
            "candidates": [int(i) for i in c.candidates],
            "ranks": {},
            "catalogue_ranks": {},
            "generated": {},
        }
        for c in cases
    ]
    if baselines:
        for name, ranks in _ranking_rows(inputs, cases, config.seed).items():
            for record, rank in zip(records, ranks, strict=True):
                record["ranks"][name] = int(rank)
        for name, ranks in _catalogue_baselines(inputs, cases).items():
            for record, rank in zip(records, ranks, strict=True):
                record["catalogue_ranks"][name] = int(rank)
    if ALLMREC in rows:
        if model.objective == "rank":
            _rank_rows(model, inputs, cases, records, config, progress, sbert)
        else:
            _llm_rows(model, inputs, cases, records, config, ALLMREC, progress)
    if LLM_ONLY in rows:
        keep = [
            i for i, c in enumerate(cases) if llm_only_users is None or c.user in llm_only_users
        ]
        _llm_rows(
            model,
            inputs,
            [cases[i] for i in keep],
            [records[i] for i in keep],
            config,
            LLM_ONLY,
            progress,
        )
    return records


# ---------------------------------------------------------------------------------------------
# The learning curve of Stage 2: the same rows on a sample of the validation split.

VALIDATION_KEYS = {
    RANK_ROW: "valid_hit@1",
    BYPASS_ROW: "valid_bypass_hit@1",
    f"{ALLMREC} ({LIKELIHOOD})": "valid_likelihood_hit@1",
}


def validation_cases(inputs: Stage2Inputs, config: Config) -> list[EvalCase]:
    """A seeded sample of `stage2.validation_users` valid-split users with the evaluator's
    seeded candidates, then those of the cold-item users beyond it
    (`stage2.validation_cold_users`; `validation_weights` tells them apart)."""
    from allmrec.training.stage2 import eval_cases, validation_cold_users, validation_users

    users = np.r_[validation_users(inputs, config), validation_cold_users(inputs, config)]
    return eval_cases(users, inputs, "valid", config.stage2.num_negatives, config.seed)


@torch.no_grad()
def validation_hits(
    model: ALLMRecLM, inputs: Stage2Inputs, cases: Sequence[EvalCase], config: Config
) -> dict[str, list[int]]:
    """Hit@1 (0 or 1) of every case, by row: the rank objective's readout and bypass, or the
    generate objective's likelihood ranking (`VALIDATION_KEYS` names them)."""
    ranking_only = config.model_copy(deep=True)
    ranking_only.evaluate.ranking, ranking_only.evaluate.generation = True, False
    records = evaluate_cases(
        model, inputs, cases, ranking_only, [ALLMREC], baselines=False, sbert=False
    )
    rows = [row for row in VALIDATION_KEYS if records and row in records[0]["ranks"]]
    return {VALIDATION_KEYS[row]: [int(r["ranks"][row] == 0) for r in records] for row in rows}


def _row_order(row: str) -> tuple:
    """A-LLMRec first, then the CF backbone, the LLM alone, popularity, random."""
    for k, prefix in enumerate(ROW_PREFIXES):
        if row.startswith(prefix):
            return (k, GENERATION not in row, row)
    return (len(ROW_PREFIXES), row)


ROW_PREFIXES = (ALLMREC, CF_PREFIX, TEXT_ROW, LLM_ONLY, "Popularity", "Random")


def summarize(records: Sequence[dict]) -> dict[str, dict]:
    """{row: metrics} over `records`, each row over the records that have it: ranking rows
    Hit@k/NDCG@k (and full-catalogue HR@10/NDCG@10 where scored), generation rows Hit@1 by
    both rules."""
    table: dict[str, dict] = {}
    ranked = dict.fromkeys(row for r in records for row in r["ranks"])
    for row in ranked:
        ranks = np.array([r["ranks"][row] for r in records if row in r["ranks"]])
        table[row] = metrics_from_ranks(ranks, RANK_KS)
        full = [r["catalogue_ranks"][row] for r in records if row in r.get("catalogue_ranks", {})]
        if full:
            table[row] |= metrics_from_ranks(np.array(full), CATALOGUE_KS, prefix="full_")
            del table[row]["full_users"]
    for row in dict.fromkeys(row for r in records for row in r["generated"]):
        outputs = [(r["generated"][row], r["true_title"]) for r in records if row in r["generated"]]
        table[row] = {
            "hit@1": float(np.mean([hit_contains(g, t) for g, t in outputs])),
            "hit@1_exact": float(np.mean([hit_exact(g, t) for g, t in outputs])),
            "users": len(outputs),
        }
    return {row: table[row] for row in sorted(table, key=_row_order)}


def paired_difference(
    records: Sequence[dict], row: str, baseline: str, resamples: int = 2000, seed: int = 0
) -> dict | None:
    """Hit@1 of `row` minus that of `baseline` over the users that have both, with a 95%
    percentile bootstrap interval (users resampled with replacement); None if no user has
    both."""
    pairs = [
        (r["ranks"][row] == 0, r["ranks"][baseline] == 0)
        for r in records
        if row in r["ranks"] and baseline in r["ranks"]
    ]
    if not pairs:
        return None
    hits = np.asarray(pairs, dtype=np.float64)
    differences = hits[:, 0] - hits[:, 1]
    draws = np.random.default_rng(seed).integers(0, len(differences), (resamples, len(pairs)))
    low, high = np.percentile(differences[draws].mean(axis=1), [2.5, 97.5])
    return {
        "row": row,
        "baseline": baseline,
        "difference": float(differences.mean()),
        "low": float(low),
        "high": float(high),
        "users": len(pairs),
        "wins": int((differences > 0).sum()),
        "losses": int((differences < 0).sum()),
    }


def paired_differences(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """The rank row against the CF backbone, the text baseline and the bypass, where the rows
    exist."""
    rows = {row for r in records for row in r["ranks"]}
    if RANK_ROW not in rows:
        return []
    baselines = sorted(row for row in rows if row.startswith(CF_PREFIX))
    baselines += [row for row in (TEXT_ROW, BYPASS_ROW) if row in rows]
    found = [paired_difference(records, RANK_ROW, b, seed=seed) for b in baselines]
    return [d for d in found if d is not None]


def label_records(records: list[dict], inputs: Stage2Inputs) -> list[dict]:
    """Adds `cold_item` and `warm_item` (the true item's label, `data.cold_item_share`)."""
    for record in records:
        record["cold_item"] = bool(inputs.cold_items[record["true_item"]])
        record["warm_item"] = bool(
            inputs.warm_items[record["true_item"]]
            if inputs.warm_items is not None
            else not record["cold_item"]
        )
    return records


# Sections of the test split's users, by their held-out item (the cold users are another
# split: `scenario_tables`' `cold_users`).
SCENARIOS: dict[str, Callable[[dict], bool]] = {
    "all users": lambda r: True,
    "warm items": lambda r: r["warm_item"],
    "cold items": lambda r: r["cold_item"],
}
COLD_USERS = "cold users"


def scenario_tables(records: list[dict], cold_users: list[dict] | None = None) -> dict[str, dict]:
    tables = {name: summarize([r for r in records if keep(r)]) for name, keep in SCENARIOS.items()}
    if cold_users is not None:
        tables[COLD_USERS] = summarize(cold_users)
    return tables


def scenario_differences(
    records: list[dict], cold_users: list[dict] | None = None, seed: int = 0
) -> dict[str, list[dict]]:
    out = {
        name: paired_differences([r for r in records if keep(r)], seed)
        for name, keep in SCENARIOS.items()
    }
    if cold_users is not None:
        out[COLD_USERS] = paired_differences(cold_users, seed)
    return out


def section_definitions(data_manifest: dict, split: str, few_shot: bool) -> dict[str, str]:
    """What each section holds (docs/method.md, section 4), with its thresholds."""
    sections = data_manifest.get("item_sections", {})
    data_config = data_manifest.get("config", {}).get("data", {})
    users = (
        "the users outside the few-shot K (never trained on)"
        if few_shot
        else "every user trained on"
    )
    held = f"{users}, on their {split} item"
    cold_max = sections.get("cold_max_interactions")
    warm_min = sections.get("warm_min_interactions")
    if cold_max is not None:
        item_share = data_config.get("cold_item_share", 0.35)
        cold = (
            f"at most {cold_max} training interactions: the bottom {item_share:.0%} of items "
            "by count"
        )
        warm = f"at least {warm_min} training interactions: the top {item_share:.0%}"
    else:
        cold = sections.get("rule", "the data's cold label")
        warm = "the other items"
    share = data_config.get("cold_user_share")
    return {
        "all users": held,
        "warm items": f"{held}, where that item is warm ({warm})",
        "cold items": f"{held}, where that item is cold ({cold})",
        COLD_USERS: (
            f"the seeded {share:.0%} of the users held out of every training stage, each on "
            "their third interaction with the first two as history"
            if share
            else "none (data.cold_user_share is 0)"
        ),
    }


# ---------------------------------------------------------------------------------------------
# Writing the table.

COLUMNS = (
    ("users", "users"),
    ("hit@1", "Hit@1"),
    ("hit@1_exact", "Hit@1 exact"),
    ("hit@3", "Hit@3"),
    ("hit@5", "Hit@5"),
    ("ndcg@5", "NDCG@5"),
    ("ndcg@10", "NDCG@10"),
    ("full_hit@10", "HR@10 all items"),
    ("full_ndcg@10", "NDCG@10 all items"),
)


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return ""
    return str(metrics[key]) if key == "users" else f"{metrics[key]:.4f}"


def format_difference(d: dict) -> str:
    return (
        f"{d['row']} - {d['baseline']}: Hit@1 {d['difference']:+.4f}, 95% bootstrap interval "
        f"[{d['low']:+.4f}, {d['high']:+.4f}] over {d['users']} users "
        f"({d['wins']} won, {d['losses']} lost)"
    )


def markdown_tables(
    tables: dict[str, dict],
    title: str,
    notes: Sequence[str] = (),
    differences: dict[str, list[dict]] | None = None,
    definitions: dict[str, str] | None = None,
) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes]
    for scenario, table in tables.items():
        users = max((m["users"] for m in table.values()), default=0)
        lines += ["", f"## {scenario} ({users} users)", ""]
        if definitions and scenario in definitions:
            lines += [f"_{definitions[scenario]}._", ""]
        if not table:
            lines.append("no user in this scenario")
            continue
        columns = [(k, c) for k, c in COLUMNS if any(k in m for m in table.values())]
        lines.append("| model | " + " | ".join(c for _, c in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for row, m in table.items():
            lines.append(f"| {row} | " + " | ".join(_cell(m, k) for k, _ in columns) + " |")
        for d in (differences or {}).get(scenario, []):
            lines += ["", f"- paired: {format_difference(d)}"]
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
    """Logs `done/total` at most every `every` seconds, with the rate. A new `total`, or a count
    that starts again from below the last one, is a new phase (the LLM-only rows after the
    A-LLMRec ones, which may have as many prompts): its rate counts from its own start."""

    def __init__(self, tag: str, every: float = 30.0) -> None:
        self.tag, self.every = tag, every
        self.started = self.last = time.perf_counter()
        self.total: int | None = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if total != self.total or done < self.done:
            self.total, self.started = total, self.last
        self.done = done
        if now - self.last >= self.every or done == total:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            log.info("%s: %d/%d prompts (%.2f/s)", self.tag, done, total, rate)
