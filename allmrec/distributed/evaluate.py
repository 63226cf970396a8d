"""`allmrec evaluate`: the trained stack and the baselines on shards of the users, as Ray tasks.

Each of `evaluate.num_workers` tasks loads the stack (the frozen LLM with the trained
projectors, the CF backbone, Stage 1's z_i) and evaluates its share of the users; the driver
gathers the per-user records and writes `eval/results.json`, `results.md` and `results.png`.
Sections (docs/method.md, section 4): all users, warm and cold items, the held-out cold users
(their third interaction), and `evaluate.cross_domain` (this run's stack recommending for the
users of other prepared data sets, with no training there: `allmrec.transfer`). A few-shot run
is a run of its own (`data.few_shot_users`): its test users are those outside its K.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray

from allmrec.config import Config, config_to_dict
from allmrec.data.prepared import COLD_USER_SPLIT, load_prepared, seeded_users
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
    section_definitions,
    summarize,
)
from allmrec.manifest import staged_output, write_manifest
from allmrec.stages import kept_point_text, read_manifest, stage_inputs
from allmrec.storage import RunStorage, open_run
from allmrec.training.cf import write_json
from allmrec.training.stage2 import STACK

log = logging.getLogger(__name__)


def _evaluate_shard(
    settings: dict,
    stack_dir: str,
    target_dir: str | None,
    split: str,
    users: list[int],
    rows: list[str],
    baselines: bool,
    tag: str,
    llm_only_users: list[int] | None = None,
) -> list[dict]:
    """Runs in a Ray task: load the stack once, evaluate `users` on `split` (the LLM-only
    rows on `llm_only_users` of them only, when given); `target_dir`: another prepared data
    set the stack recommends for (cross-domain)."""
    import torch

    from allmrec.training.stage2 import eval_cases, load_trained_stage2

    config = Config.model_validate(settings)
    torch.set_num_threads(max(1, int(config.evaluate.cpus_per_worker)))
    device = "cuda" if config.evaluate.use_gpu else "cpu"
    stack = RunStorage.open(stack_dir).pull(*STACK)
    model, inputs = load_trained_stage2(stack, device)
    if target_dir is not None:
        from allmrec.transfer import transferred_inputs

        target = RunStorage.open(target_dir).pull("data")
        inputs = transferred_inputs(
            stack, inputs, target, config.stage2.title_template, config.stage1.max_text_tokens
        )
    cases = eval_cases(np.asarray(users), inputs, split, config.stage2.num_negatives, config.seed)
    logging.basicConfig(  # the driver's format (allmrec.cli.setup_logging)
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    subset = None if llm_only_users is None else set(llm_only_users)
    records = evaluate_cases(
        model, inputs, cases, config, rows, baselines, Progress(tag), llm_only_users=subset
    )
    return label_records(records, inputs)


def _run_sharded(
    config: Config,
    stack: RunStorage,
    target: RunStorage | None,
    split: str,
    users,
    rows,
    baselines,
    tag: str,
    llm_only_users: np.ndarray | None = None,
) -> list[dict]:
    """`users` split over Ray tasks, each evaluating the stack of `stack` (on the users and
    items of the prepared data of `target`, default the stack's own) on whatever node it
    lands."""
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
            None if target is None else target.home,
            split,
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
    records = _run_sharded(
        config, run, None, cfg.split, users, rows, True, "evaluate", llm_only_users
    )
    cold_users = seeded_users(data.eval_users(COLD_USER_SPLIT), cfg.max_users, config.seed)
    cold_records = None
    if len(cold_users) and cfg.split == "test":
        log.info("evaluating the %d held-out cold users", len(cold_users))
        cold_records = _run_sharded(
            config, run, None, COLD_USER_SPLIT, cold_users, [ALLMREC], True, "cold users"
        )
    tables = scenario_tables(records, cold_records)
    differences = scenario_differences(records, cold_records, config.seed)
    definitions = section_definitions(data.manifest, cfg.split, data.few_shot)
    sections = _other_runs(config, run, rows, tables, differences, definitions)
    seconds = time.perf_counter() - started

    title = f"A-LLMRec on {run.name}: {cfg.split} split, 20 candidates per user"
    notes = _table_notes(stage2, cfg, llm_only_users)
    with staged_output(run_dir / "eval") as out:
        (out / "results.md").write_text(
            markdown_tables(tables, title, notes, differences, definitions)
        )
        plot_hit1(tables, out / "results.png", title=f"Hit@1, {run.name}")
        write_json(
            out / "results.json",
            {
                "tables": tables,
                "differences": differences,
                "definitions": definitions,
                "records": records,
                "cold_user_records": cold_records or [],
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


def _other_runs(
    config: Config, run, rows, tables: dict, differences: dict, definitions: dict
) -> dict:
    """The cross-domain sections (this run's stack recommending for another prepared data
    set, with no training there), added to `tables`, `differences` and `definitions`; their
    per-user records by section."""
    cfg = config.evaluate
    sections = {}
    for other in cfg.cross_domain:
        other = open_run(other)
        other_users = seeded_users(
            load_prepared(other.pull("data")).eval_users(cfg.split), cfg.max_users, config.seed
        )
        llm_only_users = None  # the LLM alone on a seeded subset, as in the run's own section
        if cfg.llm_only and cfg.llm_only_max_users is not None:
            llm_only_users = seeded_users(other_users, cfg.llm_only_max_users, config.seed)
        part = _run_sharded(
            config,
            run,
            other,
            cfg.split,
            other_users,
            rows,
            True,
            f"cross-domain {other.home}",
            llm_only_users,
        )
        name = f"cross-domain: {run.name} -> {other.name}"
        tables[name] = summarize(part)
        differences[name] = paired_differences(part, config.seed)
        definitions[name] = (
            f"the {cfg.split} items of {other.name}'s users, recommended by this run's stack "
            "with no training on them: an item whose normalised title and year match one of "
            "this catalogue takes that item's CF embedding and joint embedding, any other "
            "enters by its text alone (z = enc_T(q), q from this stack's Sentence-BERT); "
            "x_u is this CF model over the matched history items; the CF backbone row scores "
            "the same way, an unmatched candidate as the mean item embedding"
        )
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
            f" Kept (stage2.keep: best): {kept_point_text(kept)}, the bypass at the same point"
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
