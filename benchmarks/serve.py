"""Ray Serve on loopback: batching against batch size 1, and Serve's overhead against calling
the same model in-process, measured in one run.

1. In process: `StackRecommender.llm_request` + `StackLLM.answer` for the same requests, one at
   a time (the floor: no HTTP, no handles, no batching).
2. Serve with the LLM deployment's `@serve.batch` at max batch size 1, then at `--batch`
   (one replica each, so only batching differs): `--clients` concurrent HTTP clients send
   `--requests` requests; p50 / p99 latency and requests/s.
3. Serve, one client at a time (batch `--batch`): its p50 against the in-process time is
   Serve's overhead (HTTP, proxy, ingress, two handle calls).

Printed ratios: requests/s batched over unbatched; Serve p50 (one client) over in-process.
The mode is `generate` (the paper's protocol), where requests share one batched generation.

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
    return float(np.percentile(np.asarray(values), q))


def _run_load(bodies: list[dict], clients: int) -> tuple[list[float], float]:
    url = f"http://127.0.0.1:{PORT}/recommend"

    def one(body: dict) -> float:
        started = time.perf_counter()
        response = requests.post(url, json=body, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, bodies))
    return latencies, len(bodies) / (time.perf_counter() - started)


def _serve(run_dir: Path, batch: int) -> None:
    from allmrec.distributed.serve_launch import load_serve_config, start

    config = load_serve_config(run_dir=run_dir, port=PORT)
    app = config["applications"][0]
    app["args"]["max_batch_size"] = batch
    app["args"]["token_env"] = "ALLMREC_BENCHMARK_NO_TOKEN"
    app["deployments"] = [
        {"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
        {"name": "Recommender", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
        {
            "name": "LLM",
            "num_replicas": 1,
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1},
        },
    ]
    start(config, timeout_s=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from ray import serve

    from allmrec.api import RecommendRequest
    from allmrec.config import RayConfig
    from allmrec.distributed.runtime import init_ray
    from allmrec.serving import StackLLM, StackRecommender

    users = [str(u) for u in range(1, args.requests + 1)]
    bodies = [{"user_id": u, "mode": "generate", "k": 5} for u in users]

    torch.set_num_threads(args.threads)
    recommender, llm = StackRecommender(args.run_dir), StackLLM(args.run_dir)
    in_process = []
    for body in bodies[: max(4, args.requests // 3)]:
        started = time.perf_counter()
        llm.answer([recommender.llm_request(RecommendRequest(**body))])
        in_process.append(time.perf_counter() - started)
    del recommender, llm
    base = statistics.median(in_process)
    print(f"in process: p50 {base * 1000:.0f} ms a request ({len(in_process)} requests)")

    init_ray(RayConfig(object_store_gb=2.0))
    results = {}
    for batch in (1, args.batch):
        _serve(args.run_dir, batch)
        _run_load(bodies[:2], 2)  # warm-up
        latencies, rate = _run_load(bodies, args.clients)
        results[batch] = (latencies, rate)
        print(
            f"serve, max batch {batch}, {args.clients} clients: p50 "
            f"{_percentile(latencies, 50) * 1000:.0f} ms, p99 "
            f"{_percentile(latencies, 99) * 1000:.0f} ms, {rate:.2f} requests/s"
        )
        if batch == args.batch:
            single, _ = _run_load(bodies[: max(4, args.requests // 3)], 1)
            serve_p50 = _percentile(single, 50)
            print(f"serve, one client: p50 {serve_p50 * 1000:.0f} ms")
        serve.shutdown()
    print(
        f"ratio: requests/s with batching / without = {results[args.batch][1] / results[1][1]:.2f}"
    )
    print(f"ratio: Serve p50 (one client) / in-process p50 = {serve_p50 / base:.2f}")


if __name__ == "__main__":
    main()
