"""`allmrec evaluate`: the trained stack and the baselines on shards of the users, as Ray tasks.

Each of `evaluate.num_workers` tasks loads the stack (the frozen LLM with the trained
projectors, the CF backbone, Stage 1's z_i) and evaluates its share of the users; the driver
gathers the per-user records and writes `eval/results.json`, `results.md` and `results.png`.
Sections beyond the run's own users: `evaluate.few_shot` (other runs' projectors, trained on a
share of the users, on this run's users and candidates) and `evaluate.cross_domain` (this run's
projectors on other prepared data sets, with their own CF models and Stage 1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray

from allmrec.config import Config, config_to_dict
from allmrec.data.prepared import load_prepared, seeded_users
from allmrec.distributed.runtime import check_fits_locally
from allmrec.llm_evaluation import (
    ALLMREC,
    LLM_ONLY,
    Progress,
    evaluate_cases,
    label_records,
    markdown_tables,
    paired_differences,
    plot_hit1,
    scenario_differences,
    scenario_tables,
    summarize,
)
from allmrec.manifest import staged_output, write_manifest
from allmrec.stages import read_manifest, stage_inputs
from allmrec.storage import RunStorage, open_run
from allmrec.training.cf import write_json
from allmrec.training.stage2 import STACK, STAGE2_INPUTS

log = logging.getLogger(__name__)


def _evaluate_shard(
    settings: dict,
    stack_dir: str,
    inputs_dir: str | None,
    users: list[int],
    rows: list[str],
    baselines: bool,
    tag: str,
    llm_only_users: list[int] | None = None,
) -> list[dict]:
    """Runs in a Ray task: load the stack once, evaluate `users` (the LLM-only rows on
    `llm_only_users` of them only, when given)."""
    import torch

    from allmrec.training.stage2 import eval_cases, load_trained_stage2

    config = Config.model_validate(settings)
    torch.set_num_threads(max(1, int(config.evaluate.cpus_per_worker)))
    device = "cuda" if config.evaluate.use_gpu else "cpu"
    stack = RunStorage.open(stack_dir).pull(*STACK)
    if inputs_dir is not None:
        inputs_dir = RunStorage.open(inputs_dir).pull(*STAGE2_INPUTS)
    model, inputs = load_trained_stage2(stack, device, inputs_dir=inputs_dir)
    cases = eval_cases(
        np.asarray(users), inputs, config.evaluate.split, config.stage2.num_negatives, config.seed
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    subset = None if llm_only_users is None else set(llm_only_users)
    records = evaluate_cases(
        model, inputs, cases, config, rows, baselines, Progress(tag), llm_only_users=subset
    )
    return label_records(records, inputs, config.evaluate.cold_user_max_train)


def _run_sharded(
    config: Config,
    stack: RunStorage,
    inputs: RunStorage | None,
    users,
    rows,
    baselines,
    tag: str,
    llm_only_users: np.ndarray | None = None,
) -> list[dict]:
    """`users` split over Ray tasks, each evaluating the stack of `stack` (on the users and
    items of `inputs`, default the stack's own) on whatever node it lands."""
    cfg = config.evaluate
    # one task at a time must fit; more queue for their turn
    check_fits_locally("evaluate", 1, cfg.cpus_per_worker, int(cfg.use_gpu))
    task = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=int(cfg.use_gpu))(_evaluate_shard)
    shards = [s for s in np.array_split(np.asarray(users), cfg.num_workers) if len(s)]
    settings = config_to_dict(config)
    refs = [
        task.remote(
            settings,
            stack.home,
            None if inputs is None else inputs.home,
            [int(u) for u in shard],
            rows,
            baselines,
            f"{tag} [{k + 1}/{len(shards)}]",
            None if llm_only_users is None else [int(u) for u in llm_only_users],
        )
        for k, shard in enumerate(shards)
    ]
    records = [r for part in ray.get(refs) for r in part]
    return sorted(records, key=lambda r: r["user"])


def evaluate_stack(config: Config, run_dir: str | Path | RunStorage) -> dict:
    """Evaluate the run's trained stack; writes its `eval/`."""
    cfg = config.evaluate
    run = open_run(run_dir)
    run_dir = run.pull(*STACK)
    stage2 = read_manifest(run_dir / "stage2", "stage2")
    data = load_prepared(run_dir)
    users = seeded_users(data.eval_users(cfg.split), cfg.max_users, config.seed)
    rows = [ALLMREC] + ([LLM_ONLY] if cfg.llm_only else [])
    llm_only_users = None
    if cfg.llm_only and cfg.llm_only_max_users is not None:
        llm_only_users = seeded_users(users, cfg.llm_only_max_users, config.seed)
    started = time.perf_counter()
    log.info(
        "evaluating %d %s users (%s; %s) with %d worker(s)",
        len(users),
        cfg.split,
        ", ".join(rows),
        ", ".join(m for m, on in (("ranking", cfg.ranking), ("generation", cfg.generation)) if on),
        cfg.num_workers,
    )
    records = _run_sharded(config, run, None, users, rows, True, "evaluate", llm_only_users)
    tables = scenario_tables(records)
    differences = scenario_differences(records, config.seed)
    sections = _other_runs(config, run, users, rows, tables, differences)
    seconds = time.perf_counter() - started

    title = f"A-LLMRec on {run.name}: {cfg.split} split, 20 candidates per user"
    notes = _table_notes(stage2, cfg, llm_only_users)
    with staged_output(run_dir / "eval") as out:
        (out / "results.md").write_text(markdown_tables(tables, title, notes, differences))
        plot_hit1(tables, out / "results.png", title=f"Hit@1, {run.name}")
        write_json(
            out / "results.json",
            {
                "tables": tables,
                "differences": differences,
                "records": records,
                "sections": sections,
            },
        )
        manifest = write_manifest(
            out,
            "eval",
            config=config_to_dict(config),
            inputs=stage_inputs("eval", config, run_dir),
            users=len(users),
            tables=tables,
            differences=differences,
            seconds=round(seconds, 1),
            users_per_second=round(len(users) / max(seconds, 1e-9), 4),
        )
    run.push("eval")
    return manifest


def _other_runs(config: Config, run, users, rows, tables: dict, differences: dict) -> dict:
    """The few-shot sections (another run's Stage 2 on this run's users) and the
    cross-domain ones (this run's stack on another run's data), added to `tables` and
    `differences`; their per-user records by section."""
    cfg = config.evaluate
    sections = {}
    for other in cfg.few_shot:
        other = open_run(other)
        stage2_of_other = read_manifest(other.pull("stage2") / "stage2", "stage2")
        share = stage2_of_other["config"]["stage2"]["train_user_share"]
        part = _run_sharded(config, other, run, users, [ALLMREC], False, f"few-shot {other.home}")
        name = f"few-shot: Stage 2 on {share:.0%} of the users ({other.name})"
        tables[name] = summarize(part)
        differences[name] = paired_differences(part, config.seed)
        sections[name] = part
    for other in cfg.cross_domain:
        other = open_run(other)
        other_users = seeded_users(
            load_prepared(other.pull("data")).eval_users(cfg.split), cfg.max_users, config.seed
        )
        part = _run_sharded(
            config, run, other, other_users, rows, True, f"cross-domain {other.home}"
        )
        name = f"cross-domain: evaluated on {other.name}"
        tables[name] = summarize(part)
        differences[name] = paired_differences(part, config.seed)
        sections[name] = part
    return sections


def _table_notes(stage2: dict, cfg, llm_only_users) -> list[str]:
    """What the rows of the table are, for this stack."""
    prompts = stage2.get("train_prompts")
    trained = f"{prompts} training prompts" if prompts else f"{stage2['train_users']} users"
    notes = [
        f"LLM {stage2['llm']['name']}; Stage 2 ({stage2.get('objective', 'generate')} objective) "
        f"trained on {trained}, {stage2['epochs_run']} epoch(s). Every row ranks or generates "
        "over the same seeded candidates (the true item + 19 negatives) per user.",
        "",
    ]
    kept = stage2.get("kept") or {}
    if kept.get("keep") == "best":
        notes[0] += (
            f" Kept (stage2.keep: best): the modules at {kept['prompts']} prompts, the best "
            f"validation Hit@1 ({kept['valid_hit@1']:.3f}), the bypass at the same point"
            + (": before any training step" if not kept["prompts"] else "")
            + "."
        )
    if stage2.get("objective") == "rank":
        readout = stage2.get("readout") or {}
        layer = readout.get("layer")
        notes.append(
            f"A-LLMRec (rank): the {readout.get('kind')} readout over the frozen LLM's hidden "
            f"states{f' after block {layer}' if layer else ''}, one forward pass per user; "
            "A-LLMRec (rank, LLM bypassed): the same readout trained on F_U(x_u) and F_I(z_i) "
            "without the LLM, on the same examples. 'paired' lines: Hit@1 differences by user "
            "with 95% bootstrap intervals."
        )
    else:
        notes.append(
            "Generation rows: the paper's protocol (greedy); Hit@1 = the true title is "
            "contained in the output (the reference's rule), Hit@1 exact = the first title of "
            "the output equals it. Likelihood rows rank the candidates by the log-likelihood of "
            "their titles after the prompt."
        )
    notes.append(
        "LLM-only rows: the same prompt without embeddings"
        + (
            f", on a seeded subset of {len(llm_only_users)} of the users"
            if llm_only_users is not None
            else ""
        )
        + ". 'all items' columns rank the whole catalogue (the items the user has not "
        "interacted with before the held-out one). Random's expected Hit@1 is 0.05."
    )
    return notes
