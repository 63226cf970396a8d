"""DeepSpeed pieces shared by Stage 1 and Stage 2: the config and ZeRO-aware state handling.

On CPU: gloo and fp32 (DeepSpeed picks its CPU accelerator itself); on GPUs: NCCL and bf16.
Stage 3 partitions every parameter inside the engine's module across the workers, frozen ones
included, so what must be partitioned (the frozen LLM in Stage 2) must be inside the module.
"""

from __future__ import annotations

import sys

import psutil
import torch
from torch import nn


def deepspeed_config(
    zero_stage: int, micro_batch: int, bf16: bool, grad_clip: float | None = None
) -> dict:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # We pass a torch optimizer: DeepSpeed's own Adam compiles an extension for ~1 min.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if grad_clip:
        config["gradient_clipping"] = grad_clip
    return config


def import_deepspeed():
    """`import deepspeed` without its autotuner's MLflow hook. DeepSpeed's autotuner imports
    mlflow whenever it is installed, for every process that imports DeepSpeed: about 1.2 s of
    each Train worker's start here (a quarter of DeepSpeed's import). allmrec never runs that
    autotuner, and its MLflow logging happens in Ray Train's controller, not in the workers.
    A process that had imported mlflow already keeps it; one that imports it later gets it."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner skips it
    try:
        import deepspeed
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from building its shared-memory CPU all-reduce at a process group's start.

    It JIT-compiles the op (about 40 s of CPU each time its build files change) holding a lock
    file in torch's extension cache: a worker killed in that time (Ctrl-C, a failed node)
    leaves the lock, and every later worker on the machine waits for it forever (seen here).
    Only DeepSpeed's inference all-reduce uses the op; training's collectives are gloo's.
    The module comes from sys.modules: `import deepspeed.comm.torch as m` binds the `torch`
    package that `deepspeed.comm` re-exports under that name, and a patch of it misses."""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: list[nn.Parameter]):
    """A context in which ZeRO-3 partitioned `params` are whole on every rank (collective)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(
        [p for p in params if is_partitioned(p)], modifier_rank=None
    )


def full_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A CPU copy of `module`'s whole state dict, gathering ZeRO-3 partitions (collective:
    every rank must call it)."""
    with gathered(list(module.parameters())):
        return {
            k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in module.state_dict(prefix=prefix).items()
        }


def local_share(params: list[nn.Parameter]) -> float:
    """Share of `params`' elements this rank holds (1.0 without ZeRO-3 partitioning)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in params)
    return local / max(total, 1)


def memory_stats(device: torch.device) -> dict:
    """This worker's resident memory and, on a GPU, its peak allocated memory (GiB)."""
    stats = {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        stats["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return stats
