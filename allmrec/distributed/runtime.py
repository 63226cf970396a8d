"""Connecting to Ray: a cluster when an address is given, else a small local one."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import threading

import ray

from allmrec.config import RayConfig

log = logging.getLogger(__name__)

# Ray starts several processes on few cores; OpenMP threads that spin-wait then make a
# 2-thread torch op 10x slower (docs/method.md, section 6). Models come from packages, never a hub.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Train's controller polls its workers every 2 s by default, and a worker's
    # `ray.train.report` waits for that poll: short epochs (Stage 1: ~1.3 s) took 4 s each.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

# Only for a Ray started here, on one machine (see _init_ray).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

_started_locally = False
_shutdown_hung = False


def started_locally() -> bool:
    """True when this process started its own Ray (no cluster, no autoscaler to wait for)."""
    return _started_locally


def check_fits_locally(section: str, num_workers: int, cpus: float, gpus: int = 0) -> None:
    """On a Ray this process started, a request larger than the machine would wait forever:
    fail at once, naming the setting. On a cluster an autoscaler may add nodes, so wait."""
    if not _started_locally:
        return
    total = ray.cluster_resources()
    for name, per_worker in (("CPU", cpus), ("GPU", gpus)):
        have = total.get(name, 0)
        if num_workers * per_worker > have:
            raise ValueError(
                f"{section}: {num_workers} worker(s) x {per_worker:g} {name} need more than "
                f"the {have:g} {name}(s) of this local Ray; lower {section}.num_workers or "
                f"{section}.{'cpus_per_worker' if name == 'CPU' else 'use_gpu'}"
            )


def _inside_ray_job() -> bool:
    """True in the entry point of a submitted Ray Job (its supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _job_env_vars() -> dict:
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return {}
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address` (or $RAY_ADDRESS, as `ray job submit` sets), else start locally."""
    if ray.is_initialized():
        return
    # ray.init installs its own SIGTERM handler (it prints a stack and exits); keep the
    # command's, which shuts Serve and this Ray down first (allmrec.cli.command_lifetime).
    in_main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        _init_ray(cfg)
    finally:
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)


def _init_ray(cfg: RayConfig) -> None:
    unset_on_node = [k for k in WORKER_ENV if k not in os.environ]
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    forwarded = [*WORKER_ENV, *(k for k in ("ALLMREC_RAY_TRAIN_LOG_LEVEL",) if k in os.environ)]
    runtime_env = {"env_vars": {k: os.environ[k] for k in forwarded}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and _inside_ray_job():
        # Under `ray job submit` the job's runtime env (its working dir, the submitter's
        # env_vars) is every worker's. Ray 2.60 re-extracts the working dir when a driver adds
        # a runtime env of its own - deleting the directory this driver runs in - so add
        # nothing and say what the cluster should set instead.
        missing = [k for k in unset_on_node if k not in _job_env_vars()]
        if missing:
            log.warning(
                "the job's runtime env and this node do not set %s; set them on the cluster's "
                "nodes or in --runtime-env-json (see cluster/README.md)",
                ", ".join(missing),
            )
        log.info("joining the Ray job's cluster at %s", address)
        ray.init(address=address)
        return
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
        return
    global _started_locally
    _started_locally = True
    # Ray Train starts a preemption watcher (one more actor process) for every run to log
    # drained nodes; a Ray on one machine has no node to drain.
    for key, value in LOCAL_ENV.items():
        runtime_env["env_vars"][key] = os.environ.setdefault(key, value)  # a user's own wins
    # Another Ray may run on this machine: every worker is told which one is its own.
    runtime_env["worker_process_setup_hook"] = "allmrec.distributed.worker_setup.pin_ray_address"
    log.info("starting a local Ray (object store %.1f GiB)", cfg.object_store_gb)
    ray.init(
        num_cpus=cfg.num_cpus,
        object_store_memory=int(cfg.object_store_gb * 1024**3),
        # The dashboard serves the State API: without it Ray Train's placement-group cleaner
        # warns every few seconds that it cannot query the controller.
        include_dashboard=True,
        runtime_env=runtime_env,
    )


def shutdown_local_ray(timeout_s: float = 120) -> bool:
    """`ray.shutdown()` of a Ray this process started, and no process of it left behind.

    Ray 2.60 has two ways of leaving processes: a worker can deadlock in its own C++ exit
    handler (its core worker's destructor waits on a lock its I/O loop holds) and live on,
    sleeping, after its node is gone (seen here: a Train controller holding 500 MB for hours);
    and `ray.shutdown()` itself has hung the process that called it. So: the processes of this
    Ray (this process's descendants) are listed first; whatever is still alive 15 s after
    the shutdown is killed; a shutdown that does not return within `timeout_s` is abandoned,
    every listed process killed, and False returned. The same exit handler would run again at
    interpreter exit, so the process then ends by `exit_now` (a caller that knows its exit
    status calls it first; otherwise an exit hook does, with status 1).
    """
    import faulthandler
    import sys

    import psutil

    global _shutdown_hung
    ours = psutil.Process().children(recursive=True)
    stopper = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    hung = stopper.is_alive()
    if hung:
        log.error("ray.shutdown() did not return in %g s; killing this Ray's processes", timeout_s)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # what it waits for
        ours += psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(ours, timeout=0 if hung else 15)
    alive = [p for p in alive if _running(p)]  # an exited child not yet reaped is not alive
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)  # reaps this process's own children
    if alive and not hung:
        log.warning("killed %d process(es) of the local Ray stuck in their exit", len(alive))
    if hung and not _shutdown_hung:
        # Python's exit hooks run last-registered first: this one before Ray's, which would
        # call the hung shutdown again. A caller that knows its exit status exits first.
        atexit.register(exit_now)
    _shutdown_hung = _shutdown_hung or hung
    return not hung


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exit_now(code: int = 1) -> None:
    """End this process with `code` at once (what was printed flushed), skipping the exit
    handlers: after a hung `ray.shutdown()`, Ray's would hang again."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown_hung() -> bool:
    """True once `shutdown_local_ray` gave up on `ray.shutdown()` in this process."""
    return _shutdown_hung
