"""DeepSpeed set-up shared by the Stage 1 and Stage 2 workers."""

from __future__ import annotations

import importlib
import os


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


def test_a_worker_imports_deepspeed_without_mlflow_and_can_import_it_after():
    """A fresh process, as a Train worker starts: DeepSpeed comes without the mlflow import its
    autotuner makes (its own flag says so), and mlflow still imports afterwards."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from allmrec.training.zero import import_deepspeed\n"
        "deepspeed = import_deepspeed()\n"
        "from deepspeed.autotuning import autotuner\n"
        "print('mlflow' in sys.modules, autotuner.has_mlflow)\n"
        "import mlflow\n"
        "print(bool(mlflow.__version__))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "True"], done.stdout
