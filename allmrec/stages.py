"""The stages of a run, each declared once.

A declaration says what a stage's output depends on (config settings and the outputs of the
stages before it), which of its files later stages take as its output, and how the CLI
summarises it. From it derive, so that they can never disagree:
- the stage's inputs (`stage_inputs`), which its manifest records;
- the name of its Ray Train run (`run_name`): same inputs -> same run, so a restarted driver
  resumes it;
- whether the stage is current (`is_current`): a finished stage made from the very inputs
  that are on disk and in the config now. The chain skips a current stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from allmrec.config import Config, config_to_dict
from allmrec.manifest import FORMAT_VERSION, MANIFEST, ArtifactError, file_sha256


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the CLI's command that runs it: "train cf"
    help: str  # that command's one-line help
    title: str  # what the CLI calls its output
    settings: tuple[str, ...]  # config paths the output depends on: "cf", "data.text_encoder"
    upstream: tuple[str, ...]  # stages whose outputs it reads
    output: str | None  # its file that later stages record by sha256 (None: none reads it)
    summary: Callable[[dict, Path], str]  # (manifest, stage dir) -> what the CLI prints


def _data_summary(manifest: dict, stage_dir: Path) -> str:
    counts = manifest["counts"]
    line = (
        f"{manifest['source']['name']}: {counts['users']} users, {counts['items']} items, "
        f"{counts['interactions']} interactions {counts['splits']}"
    )
    roles = counts.get("users_by_role", {})
    sections = manifest.get("item_sections", {})
    if roles:
        line += "\nusers: " + ", ".join(
            f"{n} {ROLE_NAMES.get(role, role)}" for role, n in sorted(roles.items())
        )
    if "cold_max_interactions" in sections:
        line += (
            f"\nitems: {counts.get('cold_items')} cold (at most "
            f"{sections['cold_max_interactions']} training interactions), "
            f"{counts.get('warm_items')} warm (at least {sections['warm_min_interactions']})"
        )
    return line


ROLE_NAMES = {
    "train": "trained on",
    "cold": "held out of every stage (cold users)",
    "unseen": "outside the few-shot K (tested only)",
}


def _cf_summary(manifest: dict, stage_dir: Path) -> str:
    rows = [
        "| model | test HR@10 (100 neg) | test NDCG@10 (100 neg) | test Hit@1 (19 neg) |",
        "|---|---|---|---|",
    ]
    for name, m in manifest["metrics"].items():
        label = manifest["backbone"]["name"] if name == "model" else name
        rows.append(
            f"| {label} | {m['test_100neg_hit@10']:.4f} | "
            f"{m['test_100neg_ndcg@10']:.4f} | {m['test_19neg_hit@1']:.4f} |"
        )
    rows.append(
        f"epochs run {manifest['epochs_run']}, best epoch {manifest['best_epoch']}, "
        f"{manifest['train_seconds']} s"
    )
    return "\n".join(rows)


def _stage1_summary(manifest: dict, stage_dir: Path) -> str:
    m = manifest["metrics"]
    keys = (
        "valid_hit@1",
        "valid_ndcg@10",
        "valid_coldtext_hit@1",
        "valid_coldtext_ndcg@10",
        "valid_text_hit@1",
        "z_mean_cosine",
        "z_mean_dim_variance",
    )
    return "\n".join(f"{k}: {m[k]:.4f}" for k in keys if k in m)


def kept_point_text(kept: dict) -> str:
    """Which validation point `stage2.keep: best` kept, for the summaries and the results
    table: the manifest's `kept`."""
    text = f"the modules at {kept['prompts']} prompts, "
    compared = "validation Hit@1"
    if kept.get("compared") == "valid_weighted_hit@1":  # cold items weighted as the gate's fit
        compared = "validation Hit@1 with cold items weighted as the gate's fit"
        text += f"validation Hit@1 {kept['valid_hit@1']:.3f}, "
    value = kept.get("compared_value", kept["valid_hit@1"])
    if not kept.get("min_delta"):
        return text + f"the best {compared} ({value:.3f})"
    return text + (
        f"{compared} {value:.3f}, the best once every point after steps gives up "
        f"{kept['min_delta']:.3f} to the start"
    )


def _stage2_summary(manifest: dict, stage_dir: Path) -> str:
    m = manifest["metrics"]
    prompts = manifest.get("train_prompts")
    lines = [
        f"{manifest['llm']['name']}, {manifest['objective']} objective, "
        f"{manifest['train_users']} users x {manifest['epochs_run']} epoch(s)"
        f"{f' ({prompts} prompts)' if prompts else ''}: final loss {m['loss']:.4f}, "
        f"{m['samples_per_second']:.2f} prompts/s, ZeRO-{manifest['zero_stage']} on "
        f"{manifest['workers']} worker(s), each holding {m['llm_local_param_share']:.1%} of the "
        f"LLM's parameters, {m['mean_worker_rss_gib']:.2f} GiB resident per worker"
    ]
    curve = manifest.get("curve") or []
    if curve:
        keys = [k for k in curve[-1] if k.startswith("valid_")]
        points = ", ".join(
            f"{p['prompts']}: " + " / ".join(f"{p[k]:.3f}" for k in keys) for p in curve
        )
        lines.append(f"validation Hit@1 ({' / '.join(keys)}) by training prompts: {points}")
    kept = manifest.get("kept") or {}
    if kept.get("keep") == "best":
        lines.append(
            f"kept: {kept_point_text(kept)}"
            + (
                " - before any step: training did not improve on the start"
                if not kept["prompts"]
                else ""
            )
        )
    return "\n".join(lines)


def _eval_summary(manifest: dict, stage_dir: Path) -> str:
    return (Path(stage_dir) / "results.md").read_text()


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "data",
            "data prepare",
            "Ray Data: raw files -> Parquet splits + embeddings",
            "data",
            ("data",),
            (),
            None,
            _data_summary,
        ),
        Stage(
            "cf",
            "train cf",
            "pre-train the CF backbone (SASRec by default)",
            "CF pre-training",
            ("cf",),
            ("data",),
            "model.safetensors",
            _cf_summary,
        ),
        Stage(
            "stage1",
            "train stage1",
            "Stage 1: align CF items with item texts",
            "Stage 1",
            ("stage1", "data.text_encoder"),
            ("data", "cf"),
            "joint_item_emb.parquet",
            _stage1_summary,
        ),
        Stage(
            "stage2",
            "train stage2",
            "Stage 2: projectors into the frozen LLM",
            "Stage 2",
            ("stage2", "data.domain"),
            ("data", "cf", "stage1"),
            "projectors.safetensors",
            _stage2_summary,
        ),
        Stage(
            "eval",
            "evaluate",
            "A-LLMRec and the baselines on the same candidates: eval/results.*",
            "Evaluation",
            ("evaluate",),
            ("data", "cf", "stage1", "stage2"),
            None,
            _eval_summary,
        ),
    )
}


def _stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]


def read_manifest(stage_dir: str | Path, stage: str) -> dict:
    """The manifest of a finished `stage` in `stage_dir`, or an error saying what is wrong."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing. The '{stage}' stage has not finished in {stage_dir}; "
            f"run it first (e.g. `allmrec {_stage(stage).command}`)."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("stage") != stage:
        raise ArtifactError(
            f"{path}: field 'stage' is {manifest.get('stage')!r}, expected {stage!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: field 'format_version' is {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}: made by another version of allmrec; rerun it "
            f"(`allmrec {_stage(stage).command}`, or `allmrec demo` for the whole chain)"
        )
    return manifest


def read_finished(stage_dir: Path) -> dict | None:
    """The manifest of a finished stage directory; None if it has none (or a broken one)."""
    try:
        return json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def output_digest(name: str, run_dir: str | Path) -> str | None:
    """What later stages record of stage `name`'s output in `run_dir`: the data's fingerprint,
    or the sha256 of the stage's output file; None while it has none."""
    stage_dir = Path(run_dir) / name
    if name == "data":
        manifest = read_finished(stage_dir)
        return None if manifest is None else manifest.get("fingerprint")
    output = _stage(name).output
    if output is None or not (stage_dir / output).is_file():
        return None
    return file_sha256(stage_dir / output)


def stage_inputs(name: str, config: Config, run_dir: str | Path) -> dict:
    """Everything stage `name`'s output depends on: the seed, its config settings and the
    digests of its upstream outputs in `run_dir` (None for one that is missing)."""
    stage = _stage(name)
    settings = config_to_dict(config)
    chosen = {}
    for path in stage.settings:
        value = settings
        for key in path.split("."):
            value = value[key]
        chosen[path] = value
    return {
        "seed": config.seed,
        "settings": chosen,
        "upstream": {up: output_digest(up, run_dir) for up in stage.upstream},
    }


def recorded_upstream(manifest: dict, name: str) -> str | None:
    """The digest of upstream stage `name` that a stage's manifest recorded."""
    return manifest.get("inputs", {}).get("upstream", {}).get(name)


def run_name(name: str, inputs: dict) -> str:
    """Same inputs -> same Ray Train run name, so a restarted driver resumes that run."""
    key = json.dumps(inputs, sort_keys=True, default=str)
    return f"{name}-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def is_current(name: str, config: Config, run_dir: str | Path) -> bool:
    """Stage `name` finished in `run_dir` from exactly the inputs there and in `config` now."""
    manifest = read_finished(Path(run_dir) / name)
    if manifest is None or manifest.get("stage") != name:
        return False
    inputs = stage_inputs(name, config, run_dir)
    if None in inputs["upstream"].values():
        return False
    return manifest.get("inputs") == json.loads(json.dumps(inputs, default=str))
