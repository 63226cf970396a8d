"""The integration tier's fixtures: one small local Ray per test session, and real data,
SASRec, Stage 1 and a whole stack, each trained once through Ray and shared."""

from __future__ import annotations

import pytest

# The session's Stage 1: 4 epochs, validated at the end, a checkpoint every 2 epochs (the
# resume test runs it again with a failure at epoch 3).
STAGE1_SETTINGS = ("stage1.epochs=4", "stage1.eval_every=4", "stage1.checkpoint_every=2")
# Another seed's one-epoch Stage 1 (`other_stage1_run`).
OTHER_STAGE1_SETTINGS = (
    "seed=7",
    "stage1.epochs=1",
    "stage1.eval_every=1",
    "stage1.checkpoint_every=1",
    "stage1.eval_users=100",
)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with a 2 GiB object store, stopped when the session ends."""
    import ray
    from ray.data import DataContext

    from allmrec.config import RayConfig
    from allmrec.distributed.runtime import init_ray

    init_ray(RayConfig(object_store_gb=2.0, num_cpus=2))
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


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
    config = load_config(
        ["configs/ml-100k-cpu.yaml"], ["cf.epochs=8", "cf.lr=0.002", "cf.eval_every=8"]
    )
    train_cf(config, run_dir)
    return run_dir


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
    """`cf_run` plus a one-epoch Stage 1 of another seed (one worker, ZeRO-3): a Stage 1 that
    really differs from `stage1_run`'s, for the ZeRO-3 comparison and the cross-domain
    section."""
    import shutil

    from allmrec.config import load_config
    from allmrec.distributed.train_stage1 import train_stage1

    run_dir = tmp_path_factory.mktemp("stage1-seed7") / "run"
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


@pytest.fixture(scope="session")
def stack_run(stage1_run, tiny_llm, tmp_path_factory):
    """A whole trained stack (data, CF, Stage 1, Stage 2 with the tiny LLM and the demo's rank
    objective): what Serve loads."""
    import shutil

    from allmrec.config import load_config
    from allmrec.distributed.train_stage2 import train_stage2

    run_dir = tmp_path_factory.mktemp("stack") / "run"
    shutil.copytree(stage1_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    config = load_config(
        ["configs/ml-100k-cpu.yaml"],  # the rank objective with the user_item readout
        [
            f"stage2.llm={tiny_llm}",
            "stage2.readout_layer=null",  # the tiny LLM has 2 blocks
            "stage2.max_train_users=8",
            "stage2.validation_users=8",
            "stage2.scaling.cpus_per_worker=1",
        ],
    )
    train_stage2(config, run_dir)
    return run_dir
