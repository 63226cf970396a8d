"""The trade the text-aware readout makes between cold and warm items, swept in one run.

The `user_item_text` readout's count gate (`RankReadout.fit_gate`) is fitted before any LLM
step on the users' validation items, an example whose true item is cold weighted by
`stage2.gate_cold_weight`, and on one short-history example per user (the first items of
their sequence, `stage2.gate_short_histories`; `--no-short-histories` leaves them out). This
refits that gate as the library now fits it, on a trained run's own inputs (CF scores, its
text path's scores, counts, history lengths), for each weight of `--weights` and prints:

- validation Hit@1 (all / cold / warm, full histories), each half of the gate's examples
  scored by the gate fitted on the other half (out of sample, as `auto` chooses a weight);
- test Hit@1 on the users and candidates of the run's `eval/results.json` (the evaluator's
  seeded ones), each section's paired difference against the CF backbone's recorded ranks
  with its 95% bootstrap interval, and the ratio of cold-item Hit@1 to the CF backbone's
  (issue 26's bar is 2).

The configs are the run's own (Stage 2's manifest for the gate's examples, the evaluation's
for its candidates). Before the sweep it checks that the evaluator's candidates are
reproduced and that the run's stored gate gives the rank row it recorded, user by user (a
kept start: no LLM pass is needed); a run whose Stage 2 moved the LLM's corrections away
from zero is refused, since its scores depend on the LLM. Test ranks are taken as the
evaluator takes them (a stable sort over the prompt's order, so ties fall as they did
there); the validation columns count a tie with the true item as a miss.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/gate_frontier.py --run-dir runs/ml-1m

About a minute on ML-1M (5,400 validation users, 3,000 test users), no Ray.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from allmrec.config import Config
from allmrec.data.prepared import COLD_USER_SPLIT
from allmrec.llm_evaluation import RANK_ROW, cf_row, paired_difference
from allmrec.models.readout import CountGate, TextInputs, history_lengths
from allmrec.prompts import shown_items
from allmrec.training.stage2 import (
    eval_cases,
    example_weights,
    gate_fit_examples,
    gate_fit_users,
    load_trained_stage2,
    shown_history,
    top1_hits,
)


def top1(scores: torch.Tensor) -> np.ndarray:
    """Hit@1 per row of [E, C] scores whose true item is column 0 (ties count as misses)."""
    return top1_hits(scores).numpy()


def top1_as_shown(scores: torch.Tensor, cases) -> np.ndarray:
    """Hit@1 per case as the evaluator ranks: the scores (true item first) put in the
    prompt's order, sorted stably, the true item's place."""
    hits = []
    for row, case in zip(scores, cases, strict=True):
        place = {int(item): j for j, item in enumerate(case.candidates)}
        shown = row[[place[int(item)] for item in case.shuffled]]
        best = int(torch.argsort(shown, descending=True, stable=True)[0])
        hits.append(int(case.shuffled[best]) == int(case.candidates[0]))
    return np.array(hits)


def fit(readout, examples: Examples, weight: float) -> dict:
    """The gate fitted from its start (the CF path alone) as Stage 2 fits it: cold examples
    weighted, short-history ones not."""
    readout.gate.load_state_dict(CountGate().state_dict())
    cold, short = torch.as_tensor(examples.cold), torch.as_tensor(examples.short)
    readout.fit_gate(
        examples.cf,
        examples.text,
        examples.counts,
        examples.history_len,
        example_weights(cold, short, weight),
    )
    return {k: v.clone() for k, v in readout.gate.state_dict().items()}


@torch.no_grad()
def gated(readout, state: dict, examples: Examples) -> torch.Tensor:
    """The readout's scores of `examples` with the gate's weights `state`."""
    readout.gate.load_state_dict(state)
    return readout.gated(examples.cf, examples.text, examples.counts, examples.history_len)


def section_line(hits: np.ndarray, cold: np.ndarray, warm: np.ndarray) -> str:
    """Hit@1 of all / cold / warm users."""
    return f"{hits.mean():.4f} / {hits[cold].mean():.4f} / {hits[warm].mean():.4f}"


class Examples(NamedTuple):
    """One split's examples at the readout's start, [E, C] with the true item in column 0."""

    users: np.ndarray  # [E]
    candidates: torch.Tensor
    cf: torch.Tensor  # <x_u, g(z_c)>
    text: torch.Tensor  # the run's text path's scores (cosine or content)
    counts: torch.Tensor
    history_len: torch.Tensor  # [E]
    short: np.ndarray  # [E]: a short-history example
    cold: np.ndarray  # [E]: the true item is cold / warm
    warm: np.ndarray

    def rows(self, mask: np.ndarray) -> Examples:
        """The examples of a numpy bool `mask`."""
        return Examples(
            *(f[torch.as_tensor(mask)] if torch.is_tensor(f) else f[mask] for f in self)
        )


def load_run(run_dir: Path):
    """(the model, its inputs, Stage 2's config (the gate's examples), the evaluation's (the
    test candidates)) of a kept start of the user_item_text readout; refuses any other."""
    manifests = {
        stage: json.loads((run_dir / stage / "manifest.json").read_text())
        for stage in ("stage2", "eval")
    }
    model, inputs = load_trained_stage2(run_dir)
    readout = model.readout
    if readout is None or not readout.reads_text:
        raise SystemExit(f"{run_dir}: Stage 2 has no user_item_text readout")
    if not readout.ignores_states:
        raise SystemExit(f"{run_dir}: Stage 2 moved the LLM's corrections; needs the LLM")
    return (
        model,
        inputs,
        Config.model_validate(manifests["stage2"]["config"]),
        Config.model_validate(manifests["eval"]["config"]),
    )


def labelled(inputs, users, candidates, cf, text, counts, history_len, short) -> Examples:
    true = candidates[:, 0].numpy()
    return Examples(
        np.asarray(users),
        candidates,
        cf,
        text,
        counts,
        history_len,
        np.asarray(short, dtype=bool),
        np.asarray(inputs.cold_items, dtype=bool)[true],
        np.asarray(inputs.warm_items, dtype=bool)[true],
    )


def validation_examples(readout, inputs, config: Config, short: bool = True) -> Examples:
    """The gate's own examples: every gate-fit user's validation item, and (`short`, where
    the config has `gate_short_histories`) one short-history example per user."""
    users = gate_fit_users(inputs, config)
    ex = gate_fit_examples(readout, inputs, config, users, short)
    users = np.resize(users, len(ex.cf))  # a short-history example per user after the others
    return labelled(
        inputs, users, ex.candidates, ex.cf, ex.text, ex.counts, ex.history_len, ex.short.numpy()
    )


def test_examples(run_dir: Path, readout, inputs, evaluated: Config, cold_users: bool = False):
    """(the evaluator's test cases, their records, their Examples): the users, candidates and
    prompt histories of the run's `eval/results.json` (`cold_users`: its held-out cold
    users'), checked against its records."""
    key = "cold_user_records" if cold_users else "records"
    records = json.loads((run_dir / "eval" / "results.json").read_text())[key]
    cases = eval_cases(
        np.array([r["user"] for r in records]),
        inputs,
        COLD_USER_SPLIT if cold_users else "test",
        evaluated.stage2.num_negatives,
        evaluated.seed,
    )
    if any(c.candidates.tolist() != r["candidates"] for c, r in zip(cases, records, strict=True)):
        raise SystemExit("the evaluator's candidates are not reproduced")
    candidates = torch.as_tensor(np.stack([c.candidates for c in cases]))
    shown = [shown_items(c.history, evaluated.stage2.max_history) for c in cases]
    history, history_counts = shown_history(inputs.q, inputs.counts, shown)
    text = TextInputs(history, inputs.q[candidates], inputs.counts[candidates], history_counts)
    with torch.no_grad():
        query = readout.start_query(torch.stack([c.x_u for c in cases]), text)
        cf, scores = readout.path_scores(query, inputs.z[candidates], text)
    lengths = history_lengths(text.history)
    short = np.zeros(len(cases), dtype=bool)
    users = [c.user for c in cases]
    examples = labelled(inputs, users, candidates, cf, scores, text.counts, lengths, short)
    for label in ("cold", "warm"):
        if not (getattr(examples, label) == np.array([r[f"{label}_item"] for r in records])).all():
            raise SystemExit(f"the evaluator's {label}-item labels are not reproduced")
    return cases, records, examples


def sweep_row(
    readout,
    weight: float,
    validation: Examples,
    v_text: torch.Tensor,
    test: Examples,
    t_text: torch.Tensor,
    cases,
    cf_hits: np.ndarray,
    halves: np.ndarray,
    seed: int,
) -> str:
    """One weight's cells: validation all / cold / warm (each half scored by the gate fitted
    on the other), test all / cold / warm (the gate fitted on all), the test's paired
    differences against the CF backbone's hits (the evaluator's bootstrap `seed`) and the
    cold-item ratio. `v_text`, `t_text`: the text path's scores in the gate."""
    validation, test = validation._replace(text=v_text), test._replace(text=t_text)
    v_hits = np.zeros(len(validation.cf), dtype=bool)
    for half in (halves, ~halves):
        state = fit(readout, validation.rows(~half), weight)
        v_hits[half] = top1(gated(readout, state, validation.rows(half)))
    state = fit(readout, validation, weight)
    t_hits = top1_as_shown(gated(readout, state, test), cases)
    cells = []
    for mask in (slice(None), test.cold, test.warm):
        pairs = [
            {"ranks": {"row": 0 if a else 1, "cf": 0 if b else 1}}
            for a, b in zip(t_hits[mask], cf_hits[mask], strict=True)
        ]
        d = paired_difference(pairs, "row", "cf", seed=seed)
        cells.append(
            "no users"
            if d is None
            else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        )
    ratio = t_hits[test.cold].mean() / max(cf_hits[test.cold].mean(), 1e-12)
    full = ~validation.short  # the validation columns: full histories, as the bars
    return (
        f"{section_line(v_hits[full], validation.cold[full], validation.warm[full])} | "
        f"{section_line(t_hits, test.cold, test.warm)} | {' | '.join(cells)} | {ratio:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run evaluated")
    parser.add_argument("--weights", default="1,1.5,2,3,4,6,8")
    parser.add_argument("--seed", type=int, default=7, help="the validation halves")
    parser.add_argument(
        "--cold-users", action="store_true", help="test on the held-out cold users instead"
    )
    parser.add_argument(
        "--no-short-histories",
        action="store_true",
        help="fit the gate without the short-history examples (as before they existed)",
    )
    args = parser.parse_args()
    model, inputs, config, evaluated = load_run(args.run_dir)
    readout = model.readout
    stored = {k: v.clone() for k, v in readout.gate.state_dict().items()}
    validation = validation_examples(readout, inputs, config, not args.no_short_histories)
    cases, records, test = test_examples(
        args.run_dir, readout, inputs, evaluated, cold_users=args.cold_users
    )
    cf_name = cf_row(inputs)
    cf_hits = np.array([r["ranks"][cf_name] == 0 for r in records])

    replayed = top1_as_shown(gated(readout, stored, test), cases)
    recorded = np.array([r["ranks"][RANK_ROW] == 0 for r in records])
    if (replayed != recorded).any():
        raise SystemExit(
            f"the stored gate does not give the recorded rank row on "
            f"{int((replayed != recorded).sum())} of {len(records)} test users"
        )
    full = validation.rows(~validation.short)
    print(
        f"{args.run_dir}: gate-fit users {len(full.cf)} (cold {full.cold.sum()}, "
        f"warm {full.warm.sum()}; short-history examples {validation.short.sum()}), test users "
        f"{len(records)} (cold {test.cold.sum()}, warm {test.warm.sum()}); the stored gate "
        "gives the recorded rank row on every test user"
    )
    alone = section_line(top1(full.cf), full.cold, full.warm)
    print(f"validation, the CF path alone (all / cold / warm): {alone}")
    print(f"test, {cf_name}: {section_line(cf_hits, test.cold, test.warm)}")
    alone = section_line(top1_as_shown(test.cf, cases), test.cold, test.warm)
    print(f"test, the CF path alone: {alone}")

    halves = np.random.default_rng(args.seed).permutation(len(validation.cf))
    halves = halves < len(validation.cf) // 2
    print(
        "\n| cold weight | validation all / cold / warm | test all / cold / warm "
        "| all - CF | cold - CF | warm - CF | cold / CF |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for weight in [float(w) for w in args.weights.split(",")]:
        cells = sweep_row(
            readout,
            weight,
            validation,
            validation.text,
            test,
            test.text,
            cases,
            cf_hits,
            halves,
            evaluated.seed,
        )
        print(f"| {weight:g} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
