"""Connecting to Ray: a cluster when an address is given, else a small local one."""

from __future__ import annotations

import logging
import os

import ray

from allmrec.config import RayConfig

log = logging.getLogger(__name__)

# Ray starts several processes on few cores; OpenMP threads that spin-wait then make a
# 2-thread torch op 10x slower (CPU-FACTS.md). Models come from packages, never a hub.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address` (or $RAY_ADDRESS, as `ray job submit` sets), else start locally."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": {k: os.environ[k] for k in WORKER_ENV}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
        return
    log.info("starting a local Ray (object store %.1f GiB)", cfg.object_store_gb)
    ray.init(
        num_cpus=cfg.num_cpus,
        object_store_memory=int(cfg.object_store_gb * 1024**3),
        include_dashboard=False,
        runtime_env=runtime_env,
    )
