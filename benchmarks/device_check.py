"""The accelerator check: the library's CUDA / bf16 path, and Stage 2's speed at the paper's
LLM size, over the library alone (no Ray, no data set, no hub).

    python benchmarks/device_check.py --out device_check.json            # a GPU: ~5 minutes
    python benchmarks/device_check.py --cpu --out device_check.json      # CPU, tiny model, fp32

Two frozen LLMs built from a config with SmolLM2's tokenizer and allmrec's special tokens:
a tiny Llama (correctness) and, on a GPU, an OPT-6.7B-shaped OPT (hidden 4096, 32 blocks, FFN
16384, 32 heads; random weights, bf16). On each:

- correctness: one Stage 2 step of each objective (`rank`, `generate`) lowers the loss on a
  fixed batch; the LLM's weights are unchanged after it and hold no gradient; the `rank`
  readout's scores of a padded batch equal those of the same prompts one at a time (within
  the dtype's tolerance); greedy generation returns text;
- speed (the big model): training prompts/s of `rank` (read at `--readout-layer` and through
  every block) and of `generate`, evaluation users/s of the rank readout and of likelihood
  ranking, peak GPU memory, and each as a share of the bf16 matmul peak measured in the same
  run (model FLOPs: 2 x parameters x tokens a forward pass; a frozen LLM's backward pass
  computes input gradients only, about one forward more; attention's own FLOPs left out);
- when DeepSpeed imports: the same `rank` step inside a ZeRO-3 engine on one device, the LLM
  partitioned, equal in loss to the plain step.

It prints one table and writes it as JSON. The prompts are synthetic (random titles of 2 to
5 words, 10 history items, 20 candidates: about the length of MovieLens' prompts); x_u, z_i and
q_i are random: the check is of the code path and the speed, not of recommendations.

On a machine without the package registry (the accelerator machine), carry SmolLM2's
tokenizer as a folder: `python benchmarks/device_check.py --save-tokenizer .device/tokenizer`
here, then `--tokenizer .device/tokenizer` there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allmrec.llm import (  # noqa: E402
    add_special_tokens,
    build_small_llm,
    load_tokenizer,
    matmul_flops,
)
from allmrec.models.projection import ALLMRecLM, Stage2Example  # noqa: E402
from allmrec.prompts import build_prompt, shuffle_candidates  # noqa: E402

D_CF, D_JOINT, D_TEXT = 50, 128, 384
N_ITEMS = 2000
WORDS = (
    "night star love city last dark blue man woman road river king war house story dead "
    "little big secret time lost world heart fire summer winter return game island"
).split()


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_catalogue(seed: int = 0) -> dict:
    """Titles, z_i, q_i and interaction counts of N_ITEMS random items (index 0 padding)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    titles = [""] + [
        " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(2, 5)))
        + f" ({rng.randint(1950, 1999)})"
        for _ in range(N_ITEMS)
    ]
    return {
        "titles": titles,
        "z": torch.rand(N_ITEMS + 1, D_JOINT, generator=gen),
        "q": torch.randn(N_ITEMS + 1, D_TEXT, generator=gen),
        "counts": torch.randint(0, 300, (N_ITEMS + 1,), generator=gen),
    }


def examples(catalogue: dict, n: int, seed: int, with_targets: str | None = None) -> list:
    """`n` prompts: 10 history items, 20 shuffled candidates (the first drawn is the target)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        items = rng.sample(range(1, N_ITEMS + 1), 30)
        history, candidates = items[:10], items[10:]
        target = candidates[0]
        prompt = build_prompt(
            history, shuffle_candidates(candidates, rng.randrange(2**31)), catalogue["titles"]
        )
        out.append(
            Stage2Example(
                prompt,
                torch.randn(D_CF, generator=gen),
                catalogue["z"],
                target_title=catalogue["titles"][target] if with_targets == "generate" else None,
                target_item=target if with_targets == "rank" else None,
                item_text=catalogue["q"],
                item_counts=catalogue["counts"],
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Models


def tiny_llm(tokenizer):
    model, tokenizer = build_small_llm(hidden=64, layers=2, heads=4, tokenizer=tokenizer)
    return model, tokenizer


def opt_6_7b_shaped(tokenizer, device: str, dtype: torch.dtype, layers: int = 32):
    """OPT-6.7B's shape (hidden 4096, `layers` blocks, FFN 16384, 32 heads) with random
    weights, built on `device` in `dtype`, over SmolLM2's tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=4096,
        num_hidden_layers=layers,
        ffn_dim=16384,
        num_attention_heads=32,
        word_embed_proj_dim=4096,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16: 13 GB, not 27 GB then a copy
    try:
        with torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), tokenizer


def stage2_model(llm, tokenizer, objective: str, readout_layer: int | None, device: str):
    torch.manual_seed(0)
    model = ALLMRecLM(
        llm,
        tokenizer,
        D_CF,
        D_JOINT,
        objective=objective,
        readout="user_item_text",
        readout_layer=readout_layer,
        d_text=D_TEXT,
    )
    return model.to(device)


def _trained(model: ALLMRecLM) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("llm.")]


def _fingerprint(module: torch.nn.Module) -> list[float]:
    """A float64 sum of every tensor: any change of a weight changes it."""
    with torch.no_grad():
        return [float(p.double().sum()) for p in module.parameters()]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Checks


def check_step(model: ALLMRecLM, batch, device: str, lr: float = 1e-3) -> dict:
    """One Adam step on the trainable modules: the loss on the batch before and after, and
    whether the frozen LLM kept its weights and holds no gradient."""
    before_llm = _fingerprint(model.llm)
    optimizer = torch.optim.Adam(_trained(model), lr=lr)
    model.train()
    loss = model(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(model(batch)["loss"])
    grads = [p.grad is not None for p in model.llm.parameters()]
    return {
        "loss_before": loss.item(),
        "loss_after": after,
        "loss_fell": after < loss.item(),
        "llm_unchanged": _fingerprint(model.llm) == before_llm,
        "llm_without_grad": not any(grads)
        and not any(p.requires_grad for p in model.llm.parameters()),
    }


@torch.no_grad()
def check_batched_rank(model: ALLMRecLM, prompts: list, device: str, dtype: torch.dtype) -> dict:
    """The rank readout's scores of a padded batch against the same prompts one at a time."""
    model.eval()
    together = model.candidate_scores(model.collate(prompts).to(device)).float()
    alone = torch.cat(
        [model.candidate_scores(model.collate([p]).to(device)).float() for p in prompts]
    )
    scale = float(alone[torch.isfinite(alone)].abs().max())
    worst = float((together - alone)[torch.isfinite(alone)].abs().max())
    tolerance = (3e-2 if dtype == torch.bfloat16 else 1e-4) * max(scale, 1.0)
    return {
        "rank_batch_max_diff": worst,
        "rank_score_scale": scale,
        "rank_batched_equal": worst <= tolerance,
    }


@torch.no_grad()
def check_generation(model: ALLMRecLM, prompts: list) -> dict:
    model.eval()
    texts = model.generate(prompts[:2], max_new_tokens=8)
    return {"generated": texts, "generation_returns_text": all(isinstance(t, str) for t in texts)}


def correctness(llm, tokenizer, device: str, dtype: torch.dtype, readout_layer: int | None) -> dict:
    catalogue = synthetic_catalogue()
    out = {}
    rank = stage2_model(llm, tokenizer, "rank", readout_layer, device)
    batch = rank.collate(examples(catalogue, 4, seed=1, with_targets="rank")).to(device)
    out["rank_step"] = check_step(rank, batch, device)
    out |= check_batched_rank(rank, examples(catalogue, 4, seed=2), device, dtype)
    generate = stage2_model(llm, tokenizer, "generate", None, device)
    batch = generate.collate(examples(catalogue, 4, seed=3, with_targets="generate")).to(device)
    out["generate_step"] = check_step(generate, batch, device)
    out |= check_generation(generate, examples(catalogue, 2, seed=4))
    out["passed"] = all(
        (
            out["rank_step"]["loss_fell"],
            out["rank_step"]["llm_unchanged"],
            out["rank_step"]["llm_without_grad"],
            out["generate_step"]["loss_fell"],
            out["generate_step"]["llm_unchanged"],
            out["generate_step"]["llm_without_grad"],
            out["rank_batched_equal"],
            out["generation_returns_text"],
        )
    )
    return out


def zero3_step(llm, tokenizer, device: str, dtype: torch.dtype, readout_layer: int | None) -> dict:
    """The rank step inside a ZeRO-3 engine on one device (the LLM inside the engine,
    partitioned) against the plain step from the same weights and batch."""
    try:
        from allmrec.training.zero import deepspeed_config, import_deepspeed, skip_cpu_shm_op

        deepspeed = import_deepspeed()
    except ImportError as exc:
        return {"skipped": f"DeepSpeed does not import here ({exc})"}
    if not device.startswith("cuda"):
        skip_cpu_shm_op()  # as the Train workers do: no 40 s build of an op training never uses
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29513",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")
    catalogue = synthetic_catalogue()
    batch_examples = examples(catalogue, 2, seed=5, with_targets="rank")
    plain = stage2_model(copy.deepcopy(llm), tokenizer, "rank", readout_layer, device)
    engine_model = stage2_model(copy.deepcopy(llm), tokenizer, "rank", readout_layer, device)
    engine_model.load_state_dict(plain.state_dict(), strict=False)
    batch = plain.collate(batch_examples).to(device)
    reference = check_step(plain, batch, device)
    optimizer = torch.optim.Adam(_trained(engine_model), lr=1e-3)
    engine, *_ = deepspeed.initialize(
        model=engine_model,
        optimizer=optimizer,
        config=deepspeed_config(3, len(batch_examples), bf16=dtype == torch.bfloat16),
    )
    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after = float(engine(batch)["loss"])
    partitioned = sum(hasattr(p, "ds_tensor") for p in engine.module.llm.parameters())
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return {
        "loss_before": loss.item(),
        "loss_after": after,
        "plain_loss_before": reference["loss_before"],
        "plain_loss_after": reference["loss_after"],
        "llm_tensors_partitioned": partitioned,
        "equal_to_plain": abs(loss.item() - reference["loss_before"])
        <= tolerance * abs(reference["loss_before"])
        and abs(after - reference["loss_after"]) <= tolerance * abs(reference["loss_after"]),
    }


# ---------------------------------------------------------------------------------------------
# Speed


def _timed(step: Callable[[], None], device: str, repeats: int) -> float:
    step()  # warm-up: kernels chosen, memory allocated
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - started) / repeats


def _llm_params(model: ALLMRecLM, blocks: int | None) -> int:
    """Parameters a forward pass multiplies with: the blocks run (and the LM head for the
    generate objective's logits is left out: computed only at the target tokens)."""
    from allmrec.llm import decoder_layers

    _, _, layers = decoder_layers(model.llm)
    run = layers if blocks is None else list(layers)[:blocks]
    return sum(p.numel() for layer in run for p in layer.parameters())


def speed(
    llm,
    tokenizer,
    device: str,
    dtype: torch.dtype,
    readout_layer: int,
    batch: int,
    repeats: int,
    peak: float,
) -> dict:
    catalogue = synthetic_catalogue()
    out = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def train_rate(objective: str, layer: int | None, name: str) -> None:
        model = stage2_model(llm, tokenizer, objective, layer, device)
        prompts = examples(catalogue, batch, seed=6, with_targets=objective)
        data = model.collate(prompts).to(device)
        tokens = int(data.attention_mask.sum())
        optimizer = torch.optim.Adam(_trained(model), lr=1e-5)
        model.train()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            loss = model(data)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = _timed(step, device, repeats)
        flops = 4 * _llm_params(model, layer) * tokens  # forward + input-gradient backward
        out[name] = {
            "prompts_per_s": batch / seconds,
            "tokens_per_prompt": tokens / batch,
            "share_of_matmul_peak": flops / seconds / peak,
            "peak_gib": _peak_gib(device),
        }

    train_rate("rank", readout_layer, f"train_rank_layer{readout_layer}")
    train_rate("rank", None, "train_rank_all_layers")
    train_rate("generate", None, "train_generate")

    model = stage2_model(llm, tokenizer, "rank", readout_layer, device).eval()
    users = examples(catalogue, batch, seed=7)
    data = model.collate(users).to(device)
    tokens = int(data.attention_mask.sum())
    with torch.no_grad():
        seconds = _timed(lambda: model.candidate_scores(data), device, repeats)
    out["eval_rank_readout"] = {
        "users_per_s": batch / seconds,
        "share_of_matmul_peak": 2 * _llm_params(model, readout_layer) * tokens / seconds / peak,
        "peak_gib": _peak_gib(device),
    }
    generate = stage2_model(llm, tokenizer, "generate", None, device).eval()
    user = examples(catalogue, 1, seed=8)[0]
    titles = [catalogue["titles"][i] for i in user.prompt.candidate_items]

    def likelihood() -> None:
        generate.rank_candidates(user.prompt, user.user_vector, user.item_vectors, titles)

    with torch.no_grad():
        seconds = _timed(likelihood, device, max(1, repeats // 2))
    prompt_tokens = len(tokenizer(user.prompt.text)["input_ids"])
    title_tokens = sum(len(tokenizer(t)["input_ids"]) + 3 for t in titles)
    flops = 2 * _llm_params(generate, None) * (prompt_tokens + title_tokens)
    out["eval_likelihood_ranking"] = {
        "users_per_s": 1 / seconds,
        "share_of_matmul_peak": flops / seconds / peak,
        "peak_gib": _peak_gib(device),
    }
    return out


def _peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return None


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    tokenizer = load_tokenizer() if args.tokenizer is None else _tokenizer(args.tokenizer)
    report = {
        "device": torch.cuda.get_device_name(0) if not cpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "mode": "cpu" if cpu else "gpu",
    }
    started = time.perf_counter()
    peak_n = 1024 if cpu else 8192
    report["matmul_peak_tflops"] = {
        "float32": matmul_flops(torch.float32, device, peak_n) / 1e12,
        "bfloat16": matmul_flops(torch.bfloat16, device, peak_n) / 1e12,
    }
    peak = report["matmul_peak_tflops"]["bfloat16" if dtype == torch.bfloat16 else "float32"] * 1e12

    llm, tok = tiny_llm(copy.deepcopy(tokenizer))
    add_special_tokens(llm, tok)
    llm = llm.to(device=device, dtype=dtype)
    report["tiny_llama"] = {"correctness": correctness(llm, tok, device, dtype, readout_layer=1)}
    report["tiny_llama"]["zero3"] = (
        zero3_step(llm, tok, device, dtype, 1) if args.zero3 else {"skipped": "--no-zero3"}
    )
    report["tiny_llama"]["speed"] = speed(llm, tok, device, dtype, 1, 4, 2, peak)
    if cpu:  # the bf16 path on CPU too: a bf16 LLM under fp32 projectors and readout
        report["tiny_llama_bf16"] = {
            "correctness": correctness(llm.to(torch.bfloat16), tok, device, torch.bfloat16, 1)
        }
    if not cpu:
        big, tok = opt_6_7b_shaped(copy.deepcopy(tokenizer), device, dtype, args.layers)
        add_special_tokens(big, tok)
        params = sum(p.numel() for p in big.parameters())
        report["opt_6_7b_shaped"] = {
            "parameters": params,
            "correctness": correctness(big, tok, device, dtype, args.readout_layer),
            "speed": speed(big, tok, device, dtype, args.readout_layer, args.batch, 5, peak),
        }
        if args.zero3:
            report["opt_6_7b_shaped"]["zero3"] = zero3_step(
                big, tok, device, dtype, args.readout_layer
            )
    report["seconds"] = time.perf_counter() - started
    checks = [
        report[model]["correctness"]["passed"]
        for model in ("tiny_llama", "tiny_llama_bf16", "opt_6_7b_shaped")
        if model in report
    ]
    for model in ("tiny_llama", "opt_6_7b_shaped"):
        zero = report.get(model, {}).get("zero3", {})
        if "equal_to_plain" in zero:
            checks.append(zero["equal_to_plain"])
    report["passed"] = all(checks)
    return report


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def table(report: dict) -> str:
    """The report as one Markdown table."""
    rows = [("device", report["device"]), ("dtype", report["dtype"])]
    for kind, tflops in report["matmul_peak_tflops"].items():
        rows.append((f"matmul peak {kind}", f"{tflops:.2f} TFLOP/s"))
    for model in ("tiny_llama", "tiny_llama_bf16", "opt_6_7b_shaped"):
        if model not in report:
            continue
        part = report[model]
        checks = part["correctness"]
        rows.append((f"{model}: correctness", "pass" if checks["passed"] else "FAIL"))
        for name in ("rank_step", "generate_step"):
            s = checks[name]
            rows.append(
                (
                    f"{model}: {name} loss",
                    f"{s['loss_before']:.4f} -> {s['loss_after']:.4f}; LLM unchanged "
                    f"{s['llm_unchanged']}, no grad {s['llm_without_grad']}",
                )
            )
        rows.append(
            (
                f"{model}: rank batched vs alone",
                f"max diff {checks['rank_batch_max_diff']:.2e} (scores up to "
                f"{checks['rank_score_scale']:.2f})",
            )
        )
        zero = part.get("zero3", {})
        if "equal_to_plain" in zero:
            rows.append(
                (
                    f"{model}: ZeRO-3 step",
                    f"loss {zero['loss_before']:.4f} -> {zero['loss_after']:.4f} (plain "
                    f"{zero['plain_loss_before']:.4f} -> {zero['plain_loss_after']:.4f}), "
                    f"{zero['llm_tensors_partitioned']} LLM tensors partitioned",
                )
            )
        elif zero:
            rows.append((f"{model}: ZeRO-3 step", zero.get("skipped", "")))
        for name, m in part.get("speed", {}).items():
            rate = m.get("prompts_per_s", m.get("users_per_s"))
            unit = "prompts/s" if "prompts_per_s" in m else "users/s"
            memory = f", peak {m['peak_gib']:.1f} GiB" if m.get("peak_gib") else ""
            rows.append(
                (
                    f"{model}: {name}",
                    f"{rate:.2f} {unit}, {m['share_of_matmul_peak']:.1%} of the matmul "
                    f"peak{memory}",
                )
            )
    rows.append(("all checks", "pass" if report["passed"] else "FAIL"))
    rows.append(("seconds", f"{report['seconds']:.0f}"))
    return "\n".join(["| check | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny Llama only, fp32, on CPU")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--tokenizer", help="a saved tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--save-tokenizer", help="save SmolLM2's tokenizer here and stop")
    parser.add_argument("--layers", type=int, default=32, help="blocks of the big model")
    parser.add_argument("--readout-layer", type=int, default=11, help="the rank readout's block")
    parser.add_argument("--batch", type=int, default=8, help="prompts a timed step")
    parser.add_argument("--no-zero3", dest="zero3", action="store_false")
    args = parser.parse_args(argv)
    if args.save_tokenizer:
        load_tokenizer().save_pretrained(args.save_tokenizer)
        print(f"saved SmolLM2's tokenizer to {args.save_tokenizer}")
        return 0
    report = run(args)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
