"""What Stage 2's steps do to cold items, measured on the LLM-bypassed head in one run.

On ML-1M Stage 2's steps took validation Hit@1 of cold-item users from 0.576 at the start
to 0.491 after 500 prompts and 0.414 after 1,000, with cold training targets weighted as the
gate's fit (`stage2.cold_target_weight`), while the other users gained. The bypass is the
same head trained on the same examples without the LLM (F_U(x_u) in place of its hidden
state), so its steps take seconds instead of minutes; this trains it from a run's kept start
under each variant of what is trained and how the examples weigh, and prints validation
Hit@1 (the sample's users, the cold-item users, `valid_weighted_hit@1`) every `--every`
prompts, each variant from the same start on the same examples:

- `library`: as Stage 2 trains (every trainable module, cold targets weighted by the gate's
  cold weight);
- `unweighted`: every example alike (`stage2.cold_target_weight: 1`);
- `frozen-item-map`: the item map g, which maps z_i back to the CF space, kept as fitted;
- `frozen-text-head`: the text query's correction T kept at zero;
- `user-head-only`: only the user correction A (and F_U under it) trained;
- `valid-targets`: trained on the users' validation items after their training items (the
  gate's examples: items the CF model never trained on), the curve's users left out;
  `valid-targets-unweighted` the same, every example alike.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bypass_steps.py --run-dir runs/ml-1m

Needs a run whose Stage 2 kept its start (`kept.prompts` 0). No Ray, no LLM pass.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from allmrec.config import Config
from allmrec.distributed.train_stage2 import _training_users
from allmrec.llm_evaluation import validation_cases
from allmrec.models.readout import listwise_loss
from allmrec.training.stage2 import (
    eval_example,
    load_trained_stage2,
    target_cold_weight,
    training_examples,
    training_targets,
    validation_cold_users,
    validation_users,
    validation_weights,
)

VARIANTS = {
    # name: (cold targets weighted, names of the bypass's modules kept as they start, targets)
    "library": (True, (), "train"),
    "unweighted": (False, (), "train"),
    "frozen-item-map": (True, ("readout.item_map",), "train"),
    "frozen-text-head": (True, ("readout.text_head",), "train"),
    "user-head-only": (True, ("readout.item_map", "readout.text_head", "item_projector"), "train"),
    "valid-targets": (True, (), "valid"),
    "valid-targets-unweighted": (False, (), "valid"),
}


def valid_target_inputs(inputs, users: np.ndarray):
    """`inputs` whose training sequences end with the users' validation items: the pair
    (user, len(train)) then targets the validation item after every training item."""
    train = list(inputs.data.train)
    for u in users:
        train[int(u)] = np.append(train[int(u)], inputs.data.valid[int(u)])
    return dataclasses.replace(inputs, data=dataclasses.replace(inputs.data, train=train))


def validation_batches(model, inputs, config, cases, size: int = 64) -> list:
    """The validation cases as collated batches, with each row's true item's position."""
    batches = []
    for at in range(0, len(cases), size):
        chunk = cases[at : at + size]
        batch = model.collate([eval_example(c, inputs, config) for c in chunk])
        truth = torch.tensor([c.shuffled.index(int(c.candidates[0])) for c in chunk])
        batches.append((batch, truth))
    return batches


@torch.no_grad()
def hits_of(bypass, batches) -> np.ndarray:
    """Hit@1 (a tie with the true item is a miss) of every validation case."""
    bypass.eval()
    out = []
    for batch, truth in batches:
        scores = bypass(batch)
        true = scores.gather(1, truth[:, None])
        others = scores.scatter(1, truth[:, None], float("-inf"))
        out.append((others < true).all(1).numpy())
    bypass.train()
    return np.concatenate(out).astype(float)


def point(prompts: int, hits: np.ndarray, weights) -> dict:
    weighted = weights.weighted
    return {
        "prompts": prompts,
        "sample": float(hits @ weights.sample / weights.sample.sum()),
        "cold": float(hits @ weights.cold / max(weights.cold.sum(), 1)),
        "weighted": float(hits @ weighted / weighted.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lr", type=float, help="in place of stage2.lr")
    parser.add_argument("--cold-weight", type=float, help="in place of the gate's cold weight")
    args = parser.parse_args()
    torch.set_num_threads(2)

    manifest = json.loads((args.run_dir / "stage2" / "manifest.json").read_text())
    if manifest.get("kept", {}).get("prompts", 0) != 0:
        raise SystemExit(f"{args.run_dir}: Stage 2 kept a trained point; the variants start at 0")
    config = Config.model_validate(manifest["config"])
    cfg = config.stage2
    model, inputs = load_trained_stage2(args.run_dir)
    start = model.bypass
    cases = validation_cases(inputs, config)
    weights = validation_weights(
        cases, len(validation_users(inputs, config)), inputs, manifest["readout_start"]
    )
    batches = validation_batches(model, inputs, config, cases)
    cold_weight = args.cold_weight or target_cold_weight(config, manifest["readout_start"])
    if args.lr:
        cfg.lr = args.lr
    users = _training_users(config, inputs)
    pairs = training_targets(users, inputs.data, config, epoch=1)
    curve_users = np.r_[validation_users(inputs, config), validation_cold_users(inputs, config)]
    valid_users = np.setdiff1d(inputs.data.eval_users("valid"), curve_users)
    valid_users = np.random.default_rng(config.seed).permutation(valid_users)[: len(pairs)]
    valid_pairs = [(int(u), len(inputs.data.train[int(u)])) for u in valid_users]
    valid_inputs = valid_target_inputs(inputs, valid_users)
    order = np.random.default_rng([config.seed, 1, 0]).permutation(len(pairs))
    print(
        f"{len(cases)} validation cases ({int(weights.sample.sum())} sampled, "
        f"{int(weights.cold.sum())} cold-item), {len(pairs)} training pairs, "
        f"cold target weight {cold_weight:g}, lr {cfg.lr:g}, batch {cfg.batch_size}"
    )
    results = {}
    for name in args.variants:
        weighted, frozen, targets = VARIANTS[name]
        source, source_pairs = (
            (inputs, pairs) if targets == "train" else (valid_inputs, valid_pairs)
        )
        bypass = copy.deepcopy(start)
        for module, params in bypass.named_parameters():
            # the gate and the content path are fitted at the start and frozen, as in Stage 2
            fitted = ".gate." in module or ".content." in module
            params.requires_grad_(not fitted and not module.startswith(frozen))
        trained = [p for p in bypass.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trained, lr=cfg.lr)
        curve = [point(0, hits_of(bypass, batches), weights)]
        started = time.perf_counter()
        steps = args.prompts // cfg.batch_size
        for step in range(steps):
            take = order[(step * cfg.batch_size) % len(order) :][: cfg.batch_size]
            rng = np.random.default_rng([config.seed, 1, 0, step])
            examples = training_examples(
                [source_pairs[i] for i in take],
                source,
                config,
                rng,
                cold_weight if weighted else 1.0,
            )
            batch = model.collate(examples)
            if targets == "valid":  # collate counts a target without its own interaction,
                rows = torch.arange(len(examples))  # which a validation item never was
                batch.text.counts[rows, batch.targets] += 1
            loss = listwise_loss(bypass(batch), batch.targets, batch.weights)
            optimizer.zero_grad()
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            prompts = (step + 1) * cfg.batch_size
            if prompts % args.every == 0:
                curve.append(point(prompts, hits_of(bypass, batches), weights))
        results[name] = curve
        print(
            f"\n{name} ({sum(p.numel() for p in trained):,} trained parameters, "
            f"{time.perf_counter() - started:.0f} s)"
        )
        print("prompts  sample  cold    weighted")
        for p in curve:
            print(f"{p['prompts']:>7}  {p['sample']:.4f}  {p['cold']:.4f}  {p['weighted']:.4f}")
        first, last = curve[0], curve[-1]
        print(
            f"ratio after {last['prompts']} prompts to the start: cold "
            f"{last['cold'] / max(first['cold'], 1e-9):.3f}, sample "
            f"{last['sample'] / max(first['sample'], 1e-9):.3f}"
        )
    out = args.run_dir / "stage2" / "bypass_steps.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
