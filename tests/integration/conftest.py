"""The integration tier's fixtures: one small local Ray per test session, and real data,
SASRec, Stage 1 and a whole stack, each trained once through Ray and shared."""

from __future__ import annotations

import pytest

# The session's SASRec: 8 epochs, validated (and checkpointed) every 2 (the CF resume test runs
# it again with a failure at epoch 5).
CF_SETTINGS = ("cf.epochs=8", "cf.lr=0.002", "cf.eval_every=2")
# The session's Stage 1: 4 epochs, validated at the end, a checkpoint every 2 epochs (the
# resume test runs it again with a failure at epoch 3).
STAGE1_SETTINGS = ("stage1.epochs=4", "stage1.eval_every=4", "stage1.checkpoint_every=2")
# The session's other Stage 1 (`other_stage1_run`): two workers under ZeRO-3 that fine-tune
# the text encoder's last layer and lose a worker at the start of epoch 2 (one Ray Train run
# for partitioning, fine-tuning and resuming: each run costs most of a minute here).
OTHER_STAGE1_SETTINGS = (
    "stage1.scaling.num_workers=2",
    "stage1.text_encoder_trainable=last:1",
    "stage1.max_train_users=64",  # a batch a worker: the encoder's forward and backward dominate
    "stage1.epochs=2",
    "stage1.eval_every=2",
    "stage1.checkpoint_every=1",
    "stage1.fail_at_epoch=2",
    "stage1.eval_users=50",
)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with a 2 GiB object store, stopped when the session ends."""
    import ray
    from ray.data import DataContext

    from allmrec.config import RayConfig
    from allmrec.distributed.runtime import init_ray, shutdown_local_ray

    init_ray(RayConfig(object_store_gb=2.0, num_cpus=2))
    DataContext.get_current().enable_progress_bars = False
    yield ray
    # Bounded, and no Ray process left behind: a CI run hung in this tear-down (its only
    # one) after a failed test, for the rest of its 90 minutes.
    if not shutdown_local_ray(timeout_s=120):
        pytest.fail("ray.shutdown() hung for 120 s; this session's Ray was killed")


def pytest_unconfigure(config):
    """After a hung `ray.shutdown()`, end pytest with its status at once: Ray's exit
    handler, which hung, would run again at interpreter exit."""
    import sys

    runtime = sys.modules.get("allmrec.distributed.runtime")
    if runtime is not None and runtime.shutdown_hung():
        runtime.exit_now(int(getattr(config, "_allmrec_exitstatus", 1)) or 1)


def pytest_sessionfinish(session, exitstatus):
    session.config._allmrec_exitstatus = exitstatus


@pytest.fixture(scope="session")
def ml100k_prepared(ray_local, tmp_path_factory):
    """Real MovieLens-100K, fetched from RecBole's wheel and prepared once per session."""
    from allmrec.config import load_config
    from allmrec.distributed.data_pipeline import prepare_data

    run_dir = tmp_path_factory.mktemp("ml100k")
    config = load_config(["configs/ml-100k-cpu.yaml"])
    manifest = prepare_data(config, run_dir)
    return run_dir, manifest


@pytest.fixture(scope="session")
def cf_run(ml100k_prepared, tmp_path_factory):
    """Prepared ML-100K plus a briefly trained SASRec (the frozen CF model of Stage 1)."""
    import shutil

    from allmrec.config import load_config
    from allmrec.distributed.train_cf import train_cf

    source, _ = ml100k_prepared
    run_dir = tmp_path_factory.mktemp("cf") / "run"
    shutil.copytree(source / "data", run_dir / "data")
    train_cf(load_config(["configs/ml-100k-cpu.yaml"], list(CF_SETTINGS)), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def cf_settings():
    return CF_SETTINGS


@pytest.fixture(scope="session")
def stage1_settings():
    return STAGE1_SETTINGS


@pytest.fixture(scope="session")
def stage1_run(cf_run, tmp_path_factory):
    """`cf_run` plus a short Stage 1 (frozen text encoder): the inputs of Stage 2."""
    import shutil

    from allmrec.config import load_config
    from allmrec.distributed.train_stage1 import train_stage1

    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    shutil.copytree(cf_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    config = load_config(["configs/ml-100k-cpu.yaml"], list(STAGE1_SETTINGS))
    train_stage1(config, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def other_stage1_run(cf_run, tmp_path_factory):
    """`cf_run` plus the Stage 1 of `OTHER_STAGE1_SETTINGS` (the seed of `stage1_run`, so the
    same initial autoencoders): the ZeRO-3 test's subject, and a Stage 1 that really differs
    from `stage1_run`'s for the cross-domain section."""
    import shutil

    from allmrec.config import load_config
    from allmrec.distributed.train_stage1 import train_stage1

    run_dir = tmp_path_factory.mktemp("stage1-two") / "run"
    shutil.copytree(cf_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    config = load_config(["configs/ml-100k-cpu.yaml"], list(OTHER_STAGE1_SETTINGS))
    train_stage1(config, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a folder: `stage2.llm` names
    it by path, as a user names their own model."""
    from allmrec.llm import build_small_llm

    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    model, tokenizer = build_small_llm(hidden=64, layers=2, heads=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The session's Stage 2 (`stack_run`): the rank objective with the user_item_text readout, as
# the demo trains it, on the tiny LLM, two workers under ZeRO-3 for two epochs, a worker failing
# once at the start of the second, the best validation point kept. One Ray Train run is the
# rank tests' subject and the stack Serve loads (each run costs most of a minute here).
STACK_SETTINGS = (
    "stage2.objective=rank",
    "stage2.readout=user_item_text",
    "stage2.readout_layer=1",  # of the tiny LLM's 2 blocks
    "stage2.keep=best",
    "stage2.max_train_users=8",
    "stage2.examples_per_user=2",
    "stage2.targets=sequence",
    "stage2.batch_size=2",
    "stage2.validate_every_steps=2",
    "stage2.validation_users=4",
    "stage2.validation_cold_users=4",
    "stage2.scaling.num_workers=2",
    "stage2.scaling.cpus_per_worker=1",
    "stage2.zero_stage=3",
    "stage2.epochs=2",
    "stage2.fail_at_epoch=2",
)


@pytest.fixture(scope="session")
def stack_run(stage1_run, tiny_llm, tmp_path_factory):
    """A whole trained stack (data, CF, Stage 1, and the Stage 2 of `STACK_SETTINGS`): what
    the rank tests check and Serve loads."""
    import shutil

    from allmrec.config import load_config
    from allmrec.distributed.train_stage2 import train_stage2

    run_dir = tmp_path_factory.mktemp("stack") / "run"
    shutil.copytree(stage1_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    overrides = [f"stage2.llm={tiny_llm}", *STACK_SETTINGS]
    train_stage2(load_config(["configs/ml-100k-cpu.yaml"], overrides), run_dir)
    return run_dir
