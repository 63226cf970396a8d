"""Ray Serve's rank path on loopback against this machine's compute floor, in one run.

1. The machine: the fp32 and bf16 matmul peaks on `--threads` threads,
   measured here, now.
2. The floor: a rank request is one forward pass of its prompt through the blocks the readout
   reads (`stage2.readout_layer`); 2 x their parameters x the prompt's tokens FLOPs at the
   measured peak of the dtype the LLM replica ran in (`llm_dtype`; `auto` picks bf16 where
   it is the faster; the replica is asked, after the load) is the least time a request can
   take on this machine, and its inverse the most requests/s. The same request in-process
   (no HTTP, no Ray) is timed beside it, once Serve is down.
3. Serve with `serve_app/config.yaml`'s deployments and arguments, one replica each (so only
   the code differs between runs, never the scale): POST /recommend `{"user_id", "k": 10}`
   (the default path: the whole catalogue ranked by the readout) from 1 client, then from
   `--clients` concurrent clients; p50 / p99 latency, requests/s, errors.
4. The generate mode (the paper's protocol) from `--clients` clients, for reference.

Printed: one table and the ratio of the `--clients`-client requests/s to the floor's, with
the goals of issue 27 (>= 6 requests/s and p99 <= 2 s at 8 clients, p50 <= 0.2 s alone).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/serve.py --run-dir runs/ml-100k-cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

PORT = 18555


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _load(bodies: list[dict], clients: int) -> dict:
    url = f"http://127.0.0.1:{PORT}/recommend"

    def one(body: dict) -> float | None:
        started = time.perf_counter()
        try:
            response = requests.post(url, json=body, timeout=600)
        except requests.RequestException:
            return None
        return time.perf_counter() - started if response.status_code == 200 else None

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    seconds = time.perf_counter() - started
    latencies = [r for r in results if r is not None]
    return {
        "clients": clients,
        "requests": len(bodies),
        "p50_s": _percentile(latencies, 50),
        "p99_s": _percentile(latencies, 99),
        "requests_per_s": len(latencies) / seconds,
        "errors": len(results) - len(latencies),
    }


def floor(run_dir: Path, body: dict, threads: int, peaks: dict, dtype: str) -> dict:
    """FLOPs of one rank request, its time at the peak (of `peaks`) of `dtype`, the one the
    LLM replica ran in, and the same request in-process in it."""
    import torch

    from allmrec.api import RecommendRequest
    from allmrec.llm import decoder_layers
    from allmrec.serving import StackLLM, StackRecommender

    torch.set_num_threads(threads)
    recommender, llm = StackRecommender(run_dir), StackLLM(run_dir, dtype=dtype)
    peak = peaks[llm.dtype]
    prepared = recommender.llm_request(RecommendRequest(**body))
    batch = llm.model.collate([llm._example(prepared)])
    tokens = int(batch.attention_mask.sum())
    _, _, blocks = decoder_layers(llm.model.llm)
    layer = llm.model.readout_layer or len(blocks)
    params = sum(p.numel() for block in list(blocks)[:layer] for p in block.parameters())
    flops = 2 * params * tokens
    times = []
    with torch.no_grad():
        for _ in range(6):
            started = time.perf_counter()
            llm.answer([recommender.llm_request(RecommendRequest(**body))])
            times.append(time.perf_counter() - started)
    return {
        "tokens": tokens,
        "blocks": layer,
        "gflop_per_request": flops / 1e9,
        "floor_s": flops / peak,
        "floor_requests_per_s": peak / flops,
        "in_process_p50_s": statistics.median(times[1:]),
    }


def serve_up(run_dir: Path, overrides: list[str]) -> None:
    import yaml

    from allmrec.distributed.serve_launch import load_serve_config, start

    config = load_serve_config(run_dir=run_dir, port=PORT)
    app = config["applications"][0]
    app["args"]["token_env"] = "ALLMREC_BENCHMARK_NO_TOKEN"
    for text in overrides:  # e.g. llm_dtype=bfloat16: what one change buys, measured
        key, value = text.split("=", 1)
        app["args"][key] = yaml.safe_load(value)
    app["logging_config"] = {"enable_access_log": False}
    for deployment in app["deployments"]:  # one replica each: the code is measured, not scale
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    start(config, timeout_s=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="sent by the clients")
    parser.add_argument("--single", type=int, default=10, help="sent by one client")
    parser.add_argument("--threads", type=int, default=2, help="for the peak and the floor")
    parser.add_argument("--no-generate", dest="generate", action="store_false")
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an argument of the Serve config's app (llm_threads=1, llm_dtype=bfloat16)",
    )
    args = parser.parse_args()

    import torch
    from ray import serve

    from allmrec.config import RayConfig
    from allmrec.distributed.runtime import init_ray
    from allmrec.llm import matmul_flops

    torch.set_num_threads(args.threads)
    peaks = {"float32": matmul_flops(torch.float32), "bfloat16": matmul_flops(torch.bfloat16)}
    rank = [{"user_id": str(u), "k": 10} for u in range(1, args.requests + args.single + 2)]

    init_ray(RayConfig(object_store_gb=2.0))
    serve_up(args.run_dir, args.arg)
    _load(rank[-2:], 2)  # warm-up
    rows = {"rank, 1 client": _load(rank[: args.single], 1)}
    rows[f"rank, {args.clients} clients"] = _load(
        rank[args.single : args.single + args.requests], args.clients
    )
    if args.generate:
        bodies = [{"user_id": str(u), "mode": "generate", "k": 5} for u in range(1, 25)]
        rows[f"generate, {args.clients} clients"] = _load(bodies, args.clients)
    # the dtype the replica chose (`llm_dtype: auto` decides as it starts): the floor is that
    # dtype's, measured in process once Serve is down
    dtype = serve.get_deployment_handle("LLM", app_name="allmrec").batches.remote().result()
    dtype = dtype["dtype"]
    serve.shutdown()

    base = floor(args.run_dir, rank[0], args.threads, peaks, dtype)
    print(
        f"machine: matmul peak fp32 {peaks['float32'] / 1e9:.0f}, bf16 "
        f"{peaks['bfloat16'] / 1e9:.0f} GFLOP/s on {args.threads} threads; the LLM replica "
        f"ran in {dtype} (llm_dtype of the app's args); a rank request: {base['tokens']} "
        f"tokens through {base['blocks']} blocks, {base['gflop_per_request']:.1f} GFLOP: floor "
        f"at the {dtype} peak {base['floor_s'] * 1000:.0f} ms, "
        f"{base['floor_requests_per_s']:.1f} requests/s; in process "
        f"{base['in_process_p50_s'] * 1000:.0f} ms"
    )
    print("| load | p50 | p99 | requests/s | errors |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name}, {r['requests']} requests | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | "
            f"{r['requests_per_s']:.2f} | {r['errors']} |"
        )
    many = rows[f"rank, {args.clients} clients"]
    one = rows["rank, 1 client"]
    share = many["requests_per_s"] / base["floor_requests_per_s"]
    print(
        f"ratio: {args.clients}-client requests/s / the floor's = {share:.2f}; goals: "
        f">= 6 requests/s {'met' if many['requests_per_s'] >= 6 else 'NOT met'}, p99 <= 2 s "
        f"{'met' if many['p99_s'] <= 2 else 'NOT met'}, one client p50 <= 0.2 s "
        f"{'met' if one['p50_s'] <= 0.2 else 'NOT met'}, no errors "
        f"{'met' if not (many['errors'] or one['errors']) else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
