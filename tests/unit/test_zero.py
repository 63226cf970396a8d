"""DeepSpeed set-up shared by the Stage 1 and Stage 2 workers."""

from __future__ import annotations

import importlib


def test_the_cpu_shared_memory_op_is_never_built(monkeypatch):
    """The patch reaches the function DeepSpeed's process-group backend calls: the op is not
    JIT-compiled at every worker's start (the lock it holds meanwhile hung later workers)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from allmrec.training.zero import skip_cpu_shm_op

    module = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(module, "build_shm_op", module.build_shm_op)  # restored afterwards
    skip_cpu_shm_op()
    assert module.build_shm_op() is None
    # TorchBackend (what deepspeed.init_distributed builds) looks the function up there
    assert module.TorchBackend.__init__.__globals__ is vars(module)
    assert "build_shm_op" in module.TorchBackend.__init__.__code__.co_names
