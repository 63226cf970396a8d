"""Stage 2 on this machine, measured in one run: training prompts/s of both objectives against
the matmul peak, and evaluation users/s of every row of the results table.

What it measures, in this process (no Ray; the library pieces the Ray jobs run):

1. The machine's fp32 matmul peak on the threads given (`torch.mm` of 2048 x 2048 matrices),
   and bf16's, since some CPUs of this kind lack bf16 instructions and run it slower.
2. Training, for each objective, on the same real Stage 2 prompts (the paper's prompt, 10
   history titles, 20 candidates) with the chosen LLM frozen: forward + backward + Adam step;
   prompts/s, and FLOP/s counted by `torch.utils.flop_counter.FlopCounterMode` over one step
   (the matmuls actually run). Printed: achieved FLOP/s / peak, the utilisation.
   - `generate`: the LM loss on the true title, every block of the LLM;
   - `rank`: the listwise loss of the readout (and of the bypass), up to `stage2.readout_layer`.
3. Evaluation on the same users and candidates, users/s of each row: the rank readout (one
   forward pass a user, batched), the bypass (no LLM), likelihood ranking (the prompt once with
   its KV cache, 20 titles in one batch), greedy generation (batch 1 and batched), and the CF
   backbone. Printed: each row's users/s over generation's.

It needs a run directory with `data/`, `cf/` and `stage1/` (e.g. after `make demo`); the
projectors are fresh (the speed is the same as trained ones').

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/stage2.py --run-dir runs/ml-100k-cpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from allmrec.config import Config, load_config
from allmrec.data.prepared import seeded_users
from allmrec.llm import load_llm, matmul_flops
from allmrec.llm_evaluation import ALLMREC, LLM_ONLY, evaluate_cases
from allmrec.training.stage2 import (
    build_stage2_model,
    eval_cases,
    llm_dtype,
    load_stage2_inputs,
    start_readouts,
    training_examples,
    training_targets,
)


def train_speed(model, inputs, config: Config, steps: int, peak: float) -> float:
    """Prompts/s of `steps` training steps (after one that warms up and counts FLOPs)."""
    cfg = config.stage2
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=cfg.lr)
    pairs = training_targets(inputs.data.training_users(), inputs.data, config, epoch=1)
    rng = np.random.default_rng(0)
    model.train()
    prompts, tokens, seconds, flops = 0, 0, 0.0, 0
    for step in range(steps + 1):
        chunk = pairs[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        batch = model.collate(training_examples(chunk, inputs, config, rng))
        started = time.perf_counter()
        if step == 0:
            with FlopCounterMode(display=False) as counter:
                model(batch)["loss"].backward()
            flops = counter.get_total_flops()
        else:
            model(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            seconds += time.perf_counter() - started
            prompts += len(chunk)
            tokens += int(batch.attention_mask.sum())
    step_seconds = seconds / steps
    achieved = flops / step_seconds  # FLOPs of one step (step 0's shape, about the same)
    layers = f", up to block {cfg.readout_layer}" if cfg.objective == "rank" else ""
    print(
        f"training, {cfg.objective} objective{layers}: batch {cfg.batch_size}, "
        f"{tokens / steps:.0f} tokens a step, {step_seconds:.2f} s a step, "
        f"{prompts / seconds:.3f} prompts/s; {flops / 1e9:.1f} GFLOP a step, "
        f"{achieved / 1e9:.1f} GFLOP/s, utilisation (achieved / peak) {achieved / peak:.2f}"
    )
    model.eval()
    return prompts / seconds


def eval_speed(name: str, model, inputs, cases, config: Config, rows, baselines=False) -> float:
    started = time.perf_counter()
    records = evaluate_cases(model, inputs, cases, config, rows, baselines=baselines)
    rate = len(cases) / (time.perf_counter() - started)
    made = {row for r in records for row in (*r["ranks"], *r["generated"])}
    if not any(row.startswith(tuple(rows)) for row in made) and rows:
        # a config that does not ask for the row evaluates nothing, at any speed
        raise SystemExit(f"evaluation, {name}: no {rows} row was made (rows made: {made})")
    print(f"evaluation, {name}: {rate:.3f} users/s ({1 / rate:.2f} s a user)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--config", action="append", default=["configs/ml-100k-cpu.yaml"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--eval-users", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = matmul_flops()
    bf16 = matmul_flops(torch.bfloat16)
    print(
        f"matmul peak on {args.threads} threads: fp32 {peak / 1e9:.1f} GFLOP/s, bf16 "
        f"{bf16 / 1e9:.1f} GFLOP/s (bf16 / fp32 = {bf16 / peak:.2f})"
    )
    base = load_config(args.config)
    inputs = load_stage2_inputs(args.run_dir, base)
    llm, tokenizer = load_llm(base.stage2.llm, dtype=llm_dtype(base))  # shared by both models
    models, rates = {}, {}
    for objective in ("generate", "rank"):
        config = load_config(args.config, [f"stage2.objective={objective}"])
        torch.manual_seed(0)
        model = build_stage2_model(
            config, inputs.d_cf, inputs.d_joint, llm, tokenizer, d_text=inputs.d_text
        )
        start_readouts(model, inputs, config)
        rates[objective] = train_speed(model, inputs, config, args.train_steps, peak)
        models[objective] = (model, config)
    print(f"ratio: rank prompts/s / generate prompts/s = {rates['rank'] / rates['generate']:.2f}")

    users = seeded_users(inputs.data.eval_users("test"), args.eval_users, base.seed)
    cases = eval_cases(users, inputs, "test", base.stage2.num_negatives, base.seed)
    rank_model, rank_config = models["rank"]
    generate_model, generate_config = models["generate"]
    only = ["evaluate.llm_only=false"]
    speeds = {
        "A-LLMRec (rank) and the bypass, batched": eval_speed(
            "A-LLMRec (rank) and the bypass, batched",
            rank_model,
            inputs,
            cases,
            rank_config,
            [ALLMREC],
        ),
        "CF backbone, popularity, random": eval_speed(
            "CF backbone, popularity, random", rank_model, inputs, cases, rank_config, [], True
        ),
    }
    for name, overrides in (
        ("likelihood", ["evaluate.generation=false"]),
        (
            "generation, batch 1",
            [
                "evaluate.ranking=false",
                "evaluate.generation=true",
                "evaluate.generation_batch_size=1",
            ],
        ),
        (
            f"generation, batch {base.evaluate.generation_batch_size}",
            ["evaluate.ranking=false", "evaluate.generation=true"],
        ),
    ):
        config = load_config(args.config, ["stage2.objective=generate", *only, *overrides])
        speeds[name] = eval_speed(name, generate_model, inputs, cases, config, [LLM_ONLY])
    generation = speeds["generation, batch 1"]
    print(
        "ratio: users/s over generation's (batch 1): "
        + ", ".join(f"{name} {rate / generation:.1f}" for name, rate in speeds.items())
    )


if __name__ == "__main__":
    main()
