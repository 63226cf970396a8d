"""The trade the text-aware readout makes between cold and warm items, swept in one run.

The `user_item_text` readout's count gate (`RankReadout.fit_gate`) is fitted before any LLM
step on the users' validation items, an example whose true item is cold weighted by
`stage2.gate_cold_weight`. This refits that gate, on a trained run's own inputs (CF scores,
MiniLM cosines, counts), for each weight of `--weights` and prints:

- validation Hit@1 (all / cold / warm), each half of the gate-fit users scored by the gate
  fitted on the other half (out of sample, as a choice of weight would have to be made);
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

import numpy as np
import torch

from allmrec.config import Config
from allmrec.llm_evaluation import RANK_ROW, cf_row, paired_difference, text_profile
from allmrec.models.readout import CountGate, TextInputs
from allmrec.training.stage2 import eval_cases, gate_examples, gate_fit_users, load_trained_stage2


def top1(scores: torch.Tensor) -> np.ndarray:
    """Hit@1 per row of [E, C] scores whose true item is column 0 (ties count as misses)."""
    return (scores[:, 1:] < scores[:, :1]).all(1).numpy()


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


def fit(readout, cf, text, counts, cold, weight: float) -> dict:
    """The gate fitted from its start (the CF path alone) with cold examples weighted."""
    readout.gate.load_state_dict(CountGate().state_dict())
    readout.fit_gate(cf, text, counts, torch.where(cold, weight, 1.0))
    return {k: v.clone() for k, v in readout.gate.state_dict().items()}


@torch.no_grad()
def gated(readout, state: dict, cf, text, counts) -> torch.Tensor:
    """The readout's scores with the gate's weights `state`."""
    readout.gate.load_state_dict(state)
    return readout.gated(cf, text, counts)


def section_line(hits: np.ndarray, cold: np.ndarray, warm: np.ndarray) -> str:
    """Hit@1 of all / cold / warm users."""
    return f"{hits.mean():.4f} / {hits[cold].mean():.4f} / {hits[warm].mean():.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run evaluated")
    parser.add_argument("--weights", default="1,1.5,2,3,4,6,8")
    parser.add_argument("--seed", type=int, default=7, help="the validation halves")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    manifests = {
        stage: json.loads((args.run_dir / stage / "manifest.json").read_text())
        for stage in ("stage2", "eval")
    }
    config = Config.model_validate(manifests["stage2"]["config"])  # the gate's examples
    evaluated = Config.model_validate(manifests["eval"]["config"])  # the test candidates
    model, inputs = load_trained_stage2(args.run_dir)
    readout = model.readout
    if readout is None or not readout.reads_text:
        raise SystemExit(f"{args.run_dir}: Stage 2 has no user_item_text readout")
    if not readout.ignores_states:
        raise SystemExit(f"{args.run_dir}: Stage 2 moved the LLM's corrections; needs the LLM")
    stored = {k: v.clone() for k, v in readout.gate.state_dict().items()}
    is_cold = torch.as_tensor(np.asarray(inputs.cold_items, dtype=bool))
    is_warm = torch.as_tensor(np.asarray(inputs.warm_items, dtype=bool))

    # validation: the gate's own examples
    users = gate_fit_users(inputs, config)
    v_cf, v_text, v_counts, v_true = gate_examples(readout, inputs, config, users)
    v_cold, v_warm = is_cold[v_true].numpy(), is_warm[v_true].numpy()

    # test: the evaluator's users and candidates, its recorded CF backbone ranks
    records = json.loads((args.run_dir / "eval" / "results.json").read_text())["records"]
    cases = eval_cases(
        np.array([r["user"] for r in records]),
        inputs,
        "test",
        evaluated.stage2.num_negatives,
        evaluated.seed,
    )
    if any(c.candidates.tolist() != r["candidates"] for c, r in zip(cases, records, strict=True)):
        raise SystemExit("the evaluator's candidates are not reproduced")
    candidates = torch.as_tensor(np.stack([c.candidates for c in cases]))
    length = evaluated.stage2.max_history  # the prompt's history (none for 0)
    shown = [c.history[-length:] if length else c.history[:0] for c in cases]
    text = TextInputs(
        text_profile(inputs, shown, max(length, 1)),
        inputs.q[candidates],
        inputs.counts[candidates],
    )
    with torch.no_grad():
        query = readout.start_query(torch.stack([c.x_u for c in cases]), text)
        t_cf, t_text = readout.path_scores(query, inputs.z[candidates], text)
    t_counts = text.counts
    t_cold = np.array([r["cold_item"] for r in records])
    t_warm = np.array([r["warm_item"] for r in records])
    cf_name = cf_row(inputs)
    cf_hits = np.array([r["ranks"][cf_name] == 0 for r in records])

    replayed = top1_as_shown(gated(readout, stored, t_cf, t_text, t_counts), cases)
    recorded = np.array([r["ranks"][RANK_ROW] == 0 for r in records])
    if (replayed != recorded).any():
        raise SystemExit(
            f"the stored gate does not give the recorded rank row on "
            f"{int((replayed != recorded).sum())} of {len(records)} test users"
        )
    print(
        f"{args.run_dir}: gate-fit users {len(users)} (cold {v_cold.sum()}, warm "
        f"{v_warm.sum()}), test users {len(records)} (cold {t_cold.sum()}, warm "
        f"{t_warm.sum()}); the stored gate gives the recorded rank row on every test user"
    )
    alone = section_line(top1(v_cf), v_cold, v_warm)
    print(f"validation, the CF path alone (all / cold / warm): {alone}")
    print(f"test, {cf_name}: {section_line(cf_hits, t_cold, t_warm)}")
    print(f"test, the CF path alone: {section_line(top1_as_shown(t_cf, cases), t_cold, t_warm)}")

    halves = np.random.default_rng(args.seed).permutation(len(users)) < len(users) // 2
    print(
        "\n| cold weight | validation all / cold / warm | test all / cold / warm "
        "| all - CF | cold - CF | warm - CF | cold / CF |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for weight in weights:
        v_hits = np.zeros(len(users), dtype=bool)
        for half in (halves, ~halves):
            fitted_on, scored = torch.as_tensor(~half), torch.as_tensor(half)
            state = fit(
                readout,
                v_cf[fitted_on],
                v_text[fitted_on],
                v_counts[fitted_on],
                is_cold[v_true[fitted_on]],
                weight,
            )
            v_hits[half] = top1(
                gated(readout, state, v_cf[scored], v_text[scored], v_counts[scored])
            )
        state = fit(readout, v_cf, v_text, v_counts, is_cold[v_true], weight)
        t_hits = top1_as_shown(gated(readout, state, t_cf, t_text, t_counts), cases)
        cells = []
        for mask in (slice(None), t_cold, t_warm):
            pairs = [
                {"ranks": {"row": 0 if a else 1, "cf": 0 if b else 1}}
                for a, b in zip(t_hits[mask], cf_hits[mask], strict=True)
            ]
            d = paired_difference(pairs, "row", "cf", seed=evaluated.seed)  # the evaluator's
            cells.append(
                "no users"
                if d is None
                else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            )
        ratio = t_hits[t_cold].mean() / max(cf_hits[t_cold].mean(), 1e-12)
        print(
            f"| {weight:g} | {section_line(v_hits, v_cold, v_warm)} | "
            f"{section_line(t_hits, t_cold, t_warm)} | {' | '.join(cells)} | {ratio:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
