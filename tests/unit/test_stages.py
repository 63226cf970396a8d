"""The stage declarations: what makes a stage current, and the Ray Train run names derived
from the same inputs. Ray-free: fake finished stages written as the stages write them."""

from pathlib import Path

import pytest

from allmrec.config import load_config
from allmrec.manifest import write_manifest
from allmrec.stages import STAGES, is_current, run_name, stage_inputs


def _finish(run_dir: Path, stage: str, config, content: bytes = b"weights") -> None:
    """Write stage `stage` as finished from the inputs now in `run_dir` and `config`."""
    out = run_dir / stage
    out.mkdir(parents=True, exist_ok=True)
    fields = {}
    if stage == "data":
        fields["fingerprint"] = content.hex()
    elif STAGES[stage].output:
        (out / STAGES[stage].output).write_bytes(content)
    write_manifest(out, stage, inputs=stage_inputs(stage, config, run_dir), **fields)


@pytest.fixture
def finished_run(tmp_path: Path):
    config = load_config()
    for stage in STAGES:
        _finish(tmp_path, stage, config)
    return tmp_path, config


def test_every_stage_of_a_finished_run_is_current(finished_run):
    run_dir, config = finished_run
    assert [s for s in STAGES if is_current(s, config, run_dir)] == list(STAGES)


def test_a_changed_setting_makes_its_stage_and_no_earlier_one_stale(finished_run):
    run_dir, config = finished_run
    changed = load_config(overrides=["stage1.alpha=0.9"])
    assert [s for s in STAGES if not is_current(s, changed, run_dir)] == ["stage1"]
    # a field of another section the stage declares: the text encoder is Stage 1's input too
    changed = load_config(overrides=["data.text_encoder=embedded:other"])
    assert not is_current("stage1", changed, run_dir)
    assert is_current("cf", changed, run_dir)
    assert not is_current("data", changed, run_dir)


def test_the_seed_is_every_stages_input(finished_run):
    run_dir, _ = finished_run
    reseeded = load_config(overrides=["seed=7"])
    assert not any(is_current(s, reseeded, run_dir) for s in STAGES)


def test_a_retrained_upstream_stage_makes_every_later_stage_stale(finished_run):
    run_dir, config = finished_run
    _finish(run_dir, "cf", config, content=b"other weights")
    current = {s: is_current(s, config, run_dir) for s in STAGES}
    # Stage 2 computes x_u with the CF model itself, not only through Stage 1's output
    assert current == {"data": True, "cf": True, "stage1": False, "stage2": False, "eval": False}


def test_a_missing_upstream_output_or_manifest_is_not_current(finished_run):
    run_dir, config = finished_run
    (run_dir / "stage1" / "joint_item_emb.parquet").unlink()
    assert not is_current("stage2", config, run_dir)
    (run_dir / "cf" / "manifest.json").unlink()
    assert not is_current("cf", config, run_dir)
    (run_dir / "data" / "manifest.json").write_text("{not json")
    assert not is_current("data", config, run_dir)
    assert not is_current("cf", config, run_dir)


def test_run_names_follow_the_inputs(finished_run):
    run_dir, config = finished_run
    name = run_name("stage2", stage_inputs("stage2", config, run_dir))
    assert name.startswith("stage2-")
    assert name == run_name("stage2", stage_inputs("stage2", load_config(), run_dir))
    changed = load_config(overrides=["stage2.lr=0.5"])
    assert name != run_name("stage2", stage_inputs("stage2", changed, run_dir))
    # a setting no stage2 input depends on keeps the name: a restarted driver resumes the run
    other = load_config(overrides=["evaluate.max_users=3"])
    assert name == run_name("stage2", stage_inputs("stage2", other, run_dir))


def test_an_unknown_stage_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="stages are data, cf, stage1, stage2, eval"):
        stage_inputs("stage3", load_config(), tmp_path)


def test_each_stage_is_the_cli_command_its_declaration_names(tmp_path: Path):
    from allmrec.cli import build_parser
    from allmrec.manifest import ArtifactError
    from allmrec.stages import read_manifest

    parser = build_parser()
    for name, stage in STAGES.items():
        assert parser.parse_args(stage.command.split()).stage == name
        # A stage that has not run names that command as the fix.
        with pytest.raises(ArtifactError, match=f"run it first .*`allmrec {stage.command}`"):
            read_manifest(tmp_path / name, name)


def test_stage2_summary_names_the_kept_point(tmp_path):
    manifest = {
        "llm": {"name": "tiny"},
        "objective": "rank",
        "train_users": 8,
        "epochs_run": 1,
        "train_prompts": 8,
        "zero_stage": 0,
        "workers": 1,
        "metrics": {
            "loss": 1.0,
            "samples_per_second": 2.0,
            "llm_local_param_share": 1.0,
            "mean_worker_rss_gib": 1.0,
        },
        "curve": [
            {"prompts": 0, "valid_hit@1": 0.5, "valid_bypass_hit@1": 0.5},
            {"prompts": 8, "valid_hit@1": 0.25, "valid_bypass_hit@1": 0.5},
        ],
        "kept": {"keep": "best", "prompts": 0, "valid_hit@1": 0.5},
    }
    text = STAGES["stage2"].summary(manifest, tmp_path)
    assert "0: 0.500 / 0.500, 8: 0.250 / 0.500" in text
    assert "kept: the modules at 0 prompts, the best validation Hit@1 (0.500)" in text
    assert "before any step" in text
    manifest["kept"] = {"keep": "best", "prompts": 8, "valid_hit@1": 0.25}
    assert "before any step" not in STAGES["stage2"].summary(manifest, tmp_path)
    manifest["kept"] = {"keep": "last", "prompts": 8, "valid_hit@1": None}
    assert "kept" not in STAGES["stage2"].summary(manifest, tmp_path)
