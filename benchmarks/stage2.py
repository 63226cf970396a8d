"""Stage 2 on this machine: training throughput against the matmul peak, and evaluation speed
of likelihood ranking against generation, measured in one run.

What it measures, in this process (no Ray; the library pieces the Ray jobs run):

1. The machine's fp32 matmul peak on the threads given (`torch.mm` of 2048 x 2048 matrices).
2. Training: `ALLMRecLM.training_loss` forward + backward + Adam step on real Stage 2 batches
   (the paper's prompt, 10 history titles, 20 candidates) with the chosen LLM frozen;
   samples/s, and FLOP/s counted by `torch.utils.flop_counter.FlopCounterMode` over one step
   (the matmuls actually run: the frozen LLM's forward, the backward to its inputs only, the
   projectors). Printed: achieved FLOP/s / peak, the utilisation.
3. Evaluation on the same users and candidates: likelihood ranking (`rank_candidates`, the
   prompt once with its KV cache, 20 titles scored in one batch) against greedy generation
   (`generate`, batch 1 and `evaluate.generation_batch_size`), users/s and Hit@1 of each.
   Printed: the ranking's users/s over generation's.

It needs a run directory with `data/`, `cf/` and `stage1/` (e.g. after `make demo`, or
`allmrec train stage1`); the projectors are those of `stage2/` if present, else fresh ones
(the speed is the same; the Hit@1 then is the untrained model's).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/stage2.py --run-dir runs/ml-100k-cpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from allmrec.config import load_config
from allmrec.llm_evaluation import ALLMREC, evaluate_cases, seeded_users, summarize
from allmrec.training.stage2 import (
    build_stage2_model,
    eval_cases,
    load_stage2_inputs,
    load_trained_stage2,
    stage2_training_users,
    training_examples,
)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--config", action="append", default=["configs/ml-100k-cpu.yaml"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--eval-users", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)

    peak = matmul_peak()
    print(f"fp32 matmul peak on {args.threads} threads: {peak / 1e9:.1f} GFLOP/s")

    if (args.run_dir / "stage2" / "manifest.json").is_file():
        model, inputs = load_trained_stage2(args.run_dir)
        print("projectors: trained, from", args.run_dir / "stage2")
    else:
        inputs = load_stage2_inputs(args.run_dir, config)
        model = build_stage2_model(config, inputs.d_cf, inputs.d_joint)
        print("projectors: fresh (no stage2/ in the run directory)")

    # -- training -------------------------------------------------------------------------
    cfg = config.stage2
    optimizer = torch.optim.Adam(
        [*model.user_projector.parameters(), *model.item_projector.parameters()], lr=cfg.lr
    )
    users = stage2_training_users(inputs.data)
    rng = np.random.default_rng(0)
    model.train()
    samples, tokens, seconds, flops = 0, 0, 0.0, None
    for step in range(args.train_steps + 1):  # step 0 warms up and counts FLOPs
        batch_users = users[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        batch = model.collate(training_examples(batch_users, inputs, config, rng))
        started = time.perf_counter()
        if step == 0:
            with FlopCounterMode(display=False) as counter:
                loss = model.training_loss(batch)
                loss.backward()
            flops = counter.get_total_flops()
        else:
            loss = model.training_loss(batch)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            seconds += time.perf_counter() - started
            samples += len(batch_users)
            tokens += int(batch.attention_mask.sum())
    step_seconds = seconds / args.train_steps
    achieved = flops / step_seconds  # FLOPs of one step (step 0's shape, about the same)
    print(
        f"training: batch {cfg.batch_size}, {tokens / args.train_steps:.0f} tokens a step, "
        f"{step_seconds:.2f} s a step, {samples / seconds:.3f} samples/s, "
        f"{tokens / seconds:.0f} tokens/s"
    )
    print(
        f"training: {flops / 1e9:.1f} GFLOP a step, achieved {achieved / 1e9:.1f} GFLOP/s; "
        f"utilisation (achieved / peak) = {achieved / peak:.2f}"
    )

    # -- evaluation -----------------------------------------------------------------------
    model.eval()
    eval_users = seeded_users(inputs.data.eval_users("test"), args.eval_users, config.seed)
    cases = eval_cases(eval_users, inputs, "test", cfg.num_negatives, config.seed)
    rates = {}
    for name, overrides in (
        ("ranking", ["evaluate.generation=false"]),
        ("generation, batch 1", ["evaluate.ranking=false", "evaluate.generation_batch_size=1"]),
        (
            f"generation, batch {config.evaluate.generation_batch_size}",
            ["evaluate.ranking=false"],
        ),
    ):
        run_config = load_config(args.config, overrides)
        started = time.perf_counter()
        records = evaluate_cases(model, inputs, cases, run_config, [ALLMREC], baselines=False)
        elapsed = time.perf_counter() - started
        (row, metrics), *_ = summarize(records).items()
        rates[name] = len(cases) / elapsed
        print(
            f"evaluation, {name}: {rates[name]:.3f} users/s ({elapsed / len(cases):.2f} s a "
            f"user), {row} Hit@1 {metrics['hit@1']:.3f} on {len(cases)} users"
        )
    batched = f"generation, batch {config.evaluate.generation_batch_size}"
    print(
        f"ratio: ranking users/s / generation users/s = "
        f"{rates['ranking'] / rates['generation, batch 1']:.2f} (batch 1), "
        f"{rates['ranking'] / rates[batched]:.2f} (batched)"
    )


if __name__ == "__main__":
    main()
