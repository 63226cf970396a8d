"""Stage 2 under Ray Train and DeepSpeed, and `allmrec evaluate`, on real MovieLens-100K.

The LLM is a tiny random Llama with SmolLM2's real tokenizer, saved to a folder and named by
path in `stage2.llm`, exactly as a user names their own model; the embedded SmolLM2 runs in
`make demo` and `benchmarks/stage2.py`.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from allmrec.config import load_config
from allmrec.manifest import ArtifactError

# Two workers under ZeRO-3, two epochs, and a worker failing in the middle of the second,
# after the checkpoint of its first step: one Ray Train run of the generate objective checks
# partitioning and resuming from a mid-epoch checkpoint. (The rank objective's run is the
# session's `stack_run`, conftest.py: it fails at the start of its second epoch instead.)
TWO_WORKERS = ("stage2.scaling.num_workers=2", "stage2.zero_stage=3", "stage2.epochs=2")
FAILING_MID_EPOCH = ("stage2.fail_at_epoch=2", "stage2.fail_at_step=1")


def _config(llm, *overrides):
    return load_config(
        ["configs/ml-100k-cpu.yaml"],
        [
            f"stage2.llm={llm}",
            "stage2.objective=generate",  # the paper's; the rank run is the session's stack
            "stage2.readout_layer=1",  # of the tiny LLM's 2 blocks (rank objective)
            "stage2.max_train_users=8",
            "stage2.batch_size=2",
            "stage2.epochs=1",
            "stage2.validation_users=4",
            "stage2.scaling.cpus_per_worker=1",
            "stage2.keep=last",  # the stack keeps its best point instead
            *overrides,
        ],
    )


def _copy(stage1_run, target):
    shutil.copytree(
        stage1_run, target, ignore=shutil.ignore_patterns("checkpoints", "stage2", "eval")
    )
    return target


@pytest.fixture(scope="module")
def two_worker_run(stage1_run, tiny_llm, tmp_path_factory):
    from allmrec.distributed.train_stage2 import train_stage2

    run_dir = _copy(stage1_run, tmp_path_factory.mktemp("stage2") / "two")
    # Two epochs and a worker that fails once after the first step of the second: the same run
    # checks partitioning and resuming (each Ray Train run costs most of a minute here).
    manifest = train_stage2(
        _config(tiny_llm, *TWO_WORKERS, "stage2.checkpoint_every_steps=1", *FAILING_MID_EPOCH),
        run_dir,
    )
    return run_dir, manifest


def _probe_in_process(config, run_dir) -> float:
    """The loss of Stage 2's probe batch (the first batch of the first users, before any
    step) computed by the library alone: no Ray, no DeepSpeed, one process, the LLM whole."""
    from allmrec.distributed.train_stage2 import _training_users
    from allmrec.training.stage2 import (
        build_stage2_model,
        load_stage2_inputs,
        start_readouts,
        training_examples,
        training_targets,
    )

    inputs = load_stage2_inputs(run_dir, config)
    torch.manual_seed(config.seed)  # as every worker does before building the model
    model = build_stage2_model(config, inputs.d_cf, inputs.d_joint, d_text=inputs.d_text).eval()
    start_readouts(model, inputs, config)
    size = config.stage2.batch_size
    users = _training_users(config, inputs)[:size]
    pairs = training_targets(users, inputs.data, config, epoch=0)[:size]
    rng = np.random.default_rng([config.seed, 0])
    with torch.no_grad():
        losses = model(model.collate(training_examples(pairs, inputs, config, rng)))
    return float(losses.get("rank", losses["loss"]))


def _llm_bytes(llm_dir) -> int:
    return sum(p.stat().st_size for p in llm_dir.rglob("*.safetensors"))


def _checkpoints(run_dir, stage: str = "*") -> list:
    """The run's kept Ray Train checkpoint folders (of runs named `stage`-...), never Ray's
    checkpoint_manager_snapshot.json beside them."""
    found = (run_dir / "checkpoints").glob(f"{stage}/checkpoint_*")
    checkpoints = [p for p in found if p.is_dir()]
    assert checkpoints, f"no Ray Train checkpoint under {run_dir / 'checkpoints'}"
    return checkpoints


def _largest_checkpoint_bytes(run_dir) -> int:
    """The largest of the run's kept Ray Train checkpoints, in bytes: a Train run keeps more
    than one (the latest and the best), so each is bounded, not their sum."""
    return max(
        sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in _checkpoints(run_dir)
    )


@pytest.mark.slow
def test_zero3_partitions_the_llm_and_matches_one_process(two_worker_run, tiny_llm):
    run_dir, two = two_worker_run
    # The frozen LLM is inside the engine: each of 2 workers holds half of its elements.
    shares = [two["metrics"][f"llm_param_share_rank{r}"] for r in (0, 1)]
    assert shares == pytest.approx([0.5, 0.5], abs=0.02)  # every rank's, not only rank 0's
    # The same first batch, the same loss, partitioned over two Ray Train workers or computed
    # whole in this process by the library (a one-worker Train run would cost ~30 s more).
    one = _probe_in_process(_config(tiny_llm, *TWO_WORKERS), run_dir)
    assert two["probe_loss"] == pytest.approx(one, rel=1e-4)
    # The artifact holds the projectors only, never the LLM.
    files = {p.name for p in (run_dir / "stage2").iterdir()}
    assert files == {
        "projectors.safetensors",
        "manifest.json",
        "curves.png",
        "learning_curve.png",
        "history.json",
    }
    weights = load_file(str(run_dir / "stage2" / "projectors.safetensors"))
    assert weights and all(k.startswith(("user_projector.", "item_projector.")) for k in weights)
    assert weights["user_projector.net.0.weight"].shape == (64, 50)  # d_cf 50 -> d_llm 64
    assert weights["item_projector.net.0.weight"].shape == (64, 128)  # d_joint 128 -> d_llm
    assert np.isfinite(two["metrics"]["loss"])
    assert two["metrics"]["mean_worker_rss_gib"] > 0


@pytest.mark.slow
def test_resume_after_a_worker_failure_and_no_llm_in_checkpoints(two_worker_run, tiny_llm):
    run_dir, manifest = two_worker_run
    # resumed in epoch 2 from the checkpoint after its step 1
    assert manifest["resumed_from"] == [[1, 1]]
    assert manifest["epochs_run"] == 2
    # projectors and their Adam state only: even one ZeRO-3 rank's half of the LLM is 0.5
    assert _largest_checkpoint_bytes(run_dir) < 0.2 * _llm_bytes(tiny_llm)


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_equals_an_uninterrupted_one(
    two_worker_run, stage1_run, tiny_llm, tmp_path
):
    from allmrec.distributed.train_stage2 import train_stage2

    run_dir, resumed = two_worker_run
    uninterrupted = train_stage2(
        _config(tiny_llm, *TWO_WORKERS, "stage2.checkpoint_every_steps=1"),
        _copy(stage1_run, tmp_path / "uninterrupted"),
    )
    assert "resumed_from" not in uninterrupted or uninterrupted["resumed_from"] == []
    ours = load_file(str(run_dir / "stage2" / "projectors.safetensors"))
    theirs = load_file(str(tmp_path / "uninterrupted" / "stage2" / "projectors.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name

    # The same learning curve: the same prompts seen, the same validation Hit@1 at each point.
    def points(manifest):
        return [{k: v for k, v in p.items() if "seconds" not in k} for p in manifest["curve"]]

    assert points(resumed) == points(uninterrupted)


@pytest.mark.slow
def test_evaluate_writes_the_table_on_shared_candidates(two_worker_run):
    from allmrec.data.prepared import load_prepared, seeded_users
    from allmrec.distributed.evaluate import evaluate_stack
    from allmrec.evaluation import ALLMREC_PROTOCOL, evaluate, model_scorer
    from allmrec.training.cf import load_cf_model

    run_dir, _ = two_worker_run
    config = load_config(
        ["configs/ml-100k-cpu.yaml"],
        [
            "evaluate.max_users=8",
            "evaluate.llm_only_max_users=null",
            "evaluate.generation=true",
            "evaluate.generation_batch_size=4",
            "evaluate.max_new_tokens=8",
        ],
    )
    manifest = evaluate_stack(config, run_dir)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    table = results["tables"]["all users"]
    assert list(table) == [
        "A-LLMRec (generation)",
        "A-LLMRec (likelihood)",
        "CF backbone (sasrec)",
        "Text (MiniLM)",
        "LLM-only (generation)",
        "LLM-only (likelihood)",
        "Popularity",
        "Random",
    ]
    assert all(m["users"] == 8 for m in table.values())
    assert set(table["A-LLMRec (generation)"]) == {"hit@1", "hit@1_exact", "users"}
    assert {"hit@1", "hit@3", "hit@5", "ndcg@5", "ndcg@10"} <= set(table["LLM-only (likelihood)"])
    # The CF row ranks the very candidates the CF evaluator samples for these users.
    data = load_prepared(run_dir)
    cf_model, _ = load_cf_model(run_dir, data)
    users = seeded_users(data.eval_users("test"), 8, config.seed)
    direct = evaluate(model_scorer(cf_model), data, "test", ALLMREC_PROTOCOL, 42, users=users)
    assert table["CF backbone (sasrec)"]["ndcg@10"] == pytest.approx(direct["ndcg@10"])
    # Every user has a generated text per generation row, and the candidates are shared.
    for record in results["records"]:
        assert len(record["candidates"]) == 20 and record["candidates"][0] == record["true_item"]
        assert isinstance(record["generated"]["A-LLMRec (generation)"], str)
    # Sections: the test users by their held-out item's label (cold, warm, or the middle in
    # neither), and the held-out cold users, a seeded 8 of them, on their third interaction.
    tables = results["tables"]
    for section, label in (("warm items", "warm_item"), ("cold items", "cold_item")):
        labelled = sum(r[label] for r in results["records"])
        assert tables[section].get("Random", {}).get("users", 0) == labelled
        assert all(data.roles[r["user"]] == "train" for r in results["records"])
    cold_users = results["cold_user_records"]
    assert len(cold_users) == 8 and tables["cold users"]["Random"]["users"] == 8
    for record in cold_users:
        assert data.roles[record["user"]] == "cold"
        assert record["true_item"] == data.sequence(record["user"])[2]
    markdown = (run_dir / "eval" / "results.md").read_text()
    assert "## all users (8 users)" in markdown and "| A-LLMRec (likelihood) |" in markdown
    assert "## cold users (8 users)" in markdown and "their third interaction" in markdown
    assert "at most " in markdown and "bottom 35% of items by count" in markdown
    assert (run_dir / "eval" / "results.png").stat().st_size > 1000
    assert manifest["users"] == 8


def test_evaluate_without_stage2_is_a_clear_error(stage1_run, tmp_path):
    from allmrec.distributed.evaluate import evaluate_stack

    run_dir = _copy(stage1_run, tmp_path / "run")
    with pytest.raises(ArtifactError, match=r"stage2/manifest.json: missing"):
        evaluate_stack(load_config(["configs/ml-100k-cpu.yaml"]), run_dir)


@pytest.mark.slow
def test_rank_objective_partitions_resumes_and_keeps_only_its_modules(stack_run, tiny_llm):
    """The session's stack (conftest `STACK_SETTINGS`): the rank objective under the same
    conditions as `two_worker_run` (2 workers, ZeRO-3, two epochs), a worker failing once at
    the start of the second."""
    from allmrec.config import Config

    run_dir = stack_run
    manifest = json.loads((run_dir / "stage2" / "manifest.json").read_text())
    config = Config.model_validate(manifest["config"])  # what the run was trained with
    assert manifest["objective"] == "rank" and manifest["readout"]["kind"] == "user_item_text"
    assert manifest["metrics"]["llm_local_param_share"] == pytest.approx(0.5, abs=0.02)
    assert manifest["resumed_from"] == [[1, 0]] and manifest["epochs_run"] == 2
    # 8 users x 2 examples x 2 epochs; validation before training, within and after epochs.
    assert manifest["train_prompts"] == 32
    curve = manifest["curve"]
    assert curve[0]["prompts"] == 0 and curve[-1]["prompts"] == 32
    assert [p["prompts"] for p in curve] == sorted(p["prompts"] for p in curve)
    assert all(0 <= p["valid_hit@1"] <= 1 and "valid_bypass_hit@1" in p for p in curve)
    assert manifest["readout_start"]["rank_item_map_error"] < 0.2  # g(z_i) starts near e_i
    # partitioned over two workers, the probe batch's listwise loss is the library's own
    assert manifest["probe_loss"] == pytest.approx(_probe_in_process(config, run_dir), rel=1e-4)
    weights = load_file(str(run_dir / "stage2" / "projectors.safetensors"))
    assert {k.split(".")[0] for k in weights} == {
        "user_projector",
        "item_projector",
        "readout",
        "bypass",
    }
    assert weights["readout.item_map.weight"].shape == (50, 128)  # z_i (128) -> CF space (50)
    assert _largest_checkpoint_bytes(run_dir) < 0.2 * _llm_bytes(tiny_llm)
    history = json.loads((run_dir / "stage2" / "history.json").read_text())
    assert history["curve"] == curve

    # stage2.keep: best: the modules written are those of the best validation point ...
    # (a point after steps must beat the start by stage2.keep_min_delta; of equal Hit@1 the
    # point with the fewest trained prompts), compared by Hit@1 with the users of cold items
    # weighted as the gate's fit weighted them
    kept = manifest["kept"]
    compared = kept["compared"]
    assert compared == "valid_weighted_hit@1"
    start = next(p[compared] for p in curve if p["prompts"] == 0)
    trained = [p for p in curve if p["prompts"] > 0]
    top = max(p[compared] for p in trained)
    if top - config.stage2.keep_min_delta > start + 1e-9:
        expected = min(p["prompts"] for p in trained if p[compared] == top)
    else:
        expected = 0
    assert kept["keep"] == "best" and kept["prompts"] == expected
    [point] = [p for p in curve if p["prompts"] == kept["prompts"]]
    assert kept["valid_hit@1"] == point["valid_hit@1"]
    assert kept["compared_value"] == point[compared]
    # ... as scoring them again on the same validation cases shows, for both heads
    from allmrec.llm_evaluation import validation_cases, validation_hits
    from allmrec.training.stage2 import load_trained_stage2

    model, inputs = load_trained_stage2(run_dir)
    from allmrec.training.stage2 import (
        validation_cold_users,
        validation_users,
        validation_weights,
    )

    cases = validation_cases(inputs, config)
    sampled = len(validation_users(inputs, config))
    hits = validation_hits(model, inputs, cases, config)
    assert np.mean(hits["valid_hit@1"][:sampled]) == pytest.approx(point["valid_hit@1"])
    assert np.mean(hits["valid_bypass_hit@1"][:sampled]) == pytest.approx(
        point["valid_bypass_hit@1"]
    )
    # the cold-item users beyond the sample: every one cold, none of the sample
    beyond = validation_cold_users(inputs, config)
    assert len(beyond) > 0 and not np.isin(beyond, validation_users(inputs, config)).any()
    case_weights = validation_weights(cases, sampled, inputs, manifest["readout_start"])
    assert case_weights.cold[sampled:].all()
    cold = case_weights.cold.astype(bool)
    assert np.mean(np.asarray(hits["valid_hit@1"])[cold]) == pytest.approx(
        point["valid_cold_hit@1"]
    )
    weighted = np.dot(hits["valid_hit@1"], case_weights.weighted) / case_weights.weighted.sum()
    assert weighted == pytest.approx(point[compared])
    assert (run_dir / "stage2" / "learning_curve.png").stat().st_size > 1000

    # The gate (the readout's weights by interaction count) is fitted before any step on
    # held-out items and, `stage2.gate_trainable` false, trains no further: the kept weights
    # hold the fit itself (computed again here by the library), in the readout and the bypass
    from allmrec.training.stage2 import build_stage2_model, load_stage2_inputs, start_readouts

    assert not config.stage2.gate_trainable and manifest["readout_start"]["gate_fit_users"] > 0
    inputs = load_stage2_inputs(run_dir, config)
    torch.manual_seed(config.seed)
    fresh = build_stage2_model(config, inputs.d_cf, inputs.d_joint, d_text=inputs.d_text)
    start_readouts(fresh, inputs, config)
    start = fresh.state_dict()
    # ... on the readout's own scores: the examples drawn again from the started readout (full
    # and short histories, at its content scale) fit the same gate again
    from allmrec.models.readout import CountGate
    from allmrec.training.stage2 import example_weights, gate_fit_examples, gate_fit_users

    readout = fresh.readout
    assert abs(manifest["readout_start"]["content_scale"] - 1) > 0.05  # a scale to get wrong
    examples = gate_fit_examples(readout, inputs, config, gate_fit_users(inputs, config))
    assert examples.short.any()
    cold = torch.as_tensor(np.asarray(inputs.cold_items, dtype=bool))[examples.candidates[:, 0]]
    fitted = {k: v.clone() for k, v in readout.gate.state_dict().items()}
    readout.gate.load_state_dict(CountGate().state_dict())
    readout.gate.requires_grad_(True)  # frozen after its fit (stage2.gate_trainable false)
    readout.fit_gate(
        examples.cf,
        examples.text,
        examples.counts,
        examples.history_len,
        example_weights(cold, examples.short, manifest["readout_start"]["gate_cold_weight"]),
    )
    for key, value in readout.gate.state_dict().items():
        assert torch.allclose(value, fitted[key], rtol=1e-4, atol=1e-5), key
    readout.gate.load_state_dict(fitted)  # `start` below holds these very tensors
    readout.gate.requires_grad_(False)
    gate_keys = [k for k in weights if ".gate." in k]
    # a, b, c by count and g, h, r by history length, of the readout and of the bypass
    assert len(gate_keys) == 12
    # the kept weights and those of every Ray checkpoint kept (the latest, after the last
    # step, among them: the kept point may be the start); a refit in this process may differ
    # from the worker's in the last digits (other threads), a trained gate by far more
    checkpoints = _checkpoints(run_dir, "stage2-*")
    assert max(json.loads((c / "state.json").read_text())["prompts"] for c in checkpoints) > 0
    saved = {"kept": weights} | {
        c.name: load_file(str(c / "projectors.safetensors")) for c in checkpoints
    }
    for name, tensors in saved.items():
        for key in gate_keys:
            assert torch.allclose(tensors[key], start[key].float(), rtol=1e-4, atol=1e-5), (
                name,
                key,
            )
    if kept["prompts"] > 0:  # the rest of the readout did train
        assert not torch.equal(
            weights["readout.user_head.1.weight"], start["readout.user_head.1.weight"]
        )
    # The content path (`stage2.text_path: content`, the default) was trained at the start on
    # the training users' transitions, is frozen after, one tower in the readout and the
    # bypass; the gate's cold weight was chosen on validation among the configured ones
    readout_start = manifest["readout_start"]
    assert config.stage2.text_path == "content" and readout_start["content_transitions"] > 0
    assert readout_start["gate_cold_weight"] in config.stage2.gate_cold_weights
    chosen = [r for r in readout_start["gate_cold_weight_table"] if r["path"] == "gate"]
    assert [r["weight"] for r in chosen] == sorted(config.stage2.gate_cold_weights)
    # one short-history example per gate-fit user (the first items of their sequence), scored
    # in the choice's table beside the full histories
    assert readout_start["gate_fit_short_histories"] == readout_start["gate_fit_users"]
    assert all(r["short"] is not None and "short_gain_low" in r for r in chosen)
    history_weights = weights["readout.gate.text_by_history"]
    assert not torch.equal(history_weights, torch.ones_like(history_weights))  # fitted
    content_keys = [k for k in weights if k.startswith("readout.content")]
    assert "readout.content_scale" in content_keys and len(content_keys) > 5
    for key in content_keys:
        twin = key.replace("readout.", "bypass.readout.", 1)
        assert torch.equal(weights[key], weights[twin]), key
        for name, tensors in saved.items():
            assert torch.equal(tensors[key], weights[key]), (name, key)  # frozen
        ours = start[key].to(weights[key].dtype)  # count_buckets is an integer buffer
        assert torch.allclose(weights[key], ours, rtol=1e-3, atol=1e-4), key


@pytest.mark.slow
def test_evaluate_a_rank_stack_rows_catalogue_and_paired_intervals(stack_run):
    from allmrec.distributed.evaluate import evaluate_stack

    run_dir = stack_run
    config = load_config(
        ["configs/ml-100k-cpu.yaml"],
        ["evaluate.max_users=8", "evaluate.llm_only_max_users=4", "evaluate.generation=false"],
    )
    evaluate_stack(config, run_dir)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    table = results["tables"]["all users"]
    assert list(table) == [
        "A-LLMRec (SBERT)",
        "A-LLMRec (rank)",
        "A-LLMRec (rank, LLM bypassed)",
        "CF backbone (sasrec)",
        "Text (MiniLM)",
        "LLM-only (likelihood)",
        "Popularity",
        "Random",
    ]
    assert table["LLM-only (likelihood)"]["users"] == 4 and table["Random"]["users"] == 8
    scored = ("A-LLMRec (rank)", "A-LLMRec (rank, LLM bypassed)", "A-LLMRec (SBERT)")
    for row in (*scored, "CF backbone (sasrec)", "Text (MiniLM)"):
        assert 0 <= table[row]["full_hit@10"] <= 1 and "full_ndcg@10" in table[row]
    assert "full_hit@10" not in table["Random"]
    # the SBERT row is the same stack over z_i = enc_T(q_i): other scores than the item path's
    records = results["records"]
    assert any(r["ranks"]["A-LLMRec (SBERT)"] != r["ranks"]["A-LLMRec (rank)"] for r in records)
    pairs = results["differences"]["all users"]
    assert [(d["row"], d["baseline"]) for d in pairs] == [
        ("A-LLMRec (rank)", "CF backbone (sasrec)"),
        ("A-LLMRec (rank)", "Text (MiniLM)"),
        ("A-LLMRec (rank)", "A-LLMRec (rank, LLM bypassed)"),
    ]
    assert all(d["low"] <= d["difference"] <= d["high"] and d["users"] == 8 for d in pairs)
    for record in results["records"]:
        assert 0 <= record["ranks"]["A-LLMRec (rank)"] < 20
        assert record["catalogue_ranks"]["A-LLMRec (rank)"] >= record["ranks"]["A-LLMRec (rank)"]
    markdown = (run_dir / "eval" / "results.md").read_text()
    assert "- paired: A-LLMRec (rank) - CF backbone (sasrec): Hit@1" in markdown
    assert "seeded subset of 4 of the users" in markdown


@pytest.fixture(scope="module")
def every_item_data(ray_local, tmp_path_factory):
    """MovieLens-100K prepared again with every item kept (no 5-core on items): another
    catalogue (333 items the session's stack never saw, other ids for the rest) and the same
    users under other roles: the cross-domain section's target."""
    from allmrec.distributed.data_pipeline import prepare_data

    run_dir = tmp_path_factory.mktemp("every-item") / "run"
    config = load_config(["configs/ml-100k-cpu.yaml"], ["data.min_item_interactions=1", "seed=7"])
    prepare_data(config, run_dir)
    return run_dir


@pytest.mark.slow
def test_cross_domain_recommends_for_another_catalogue_with_no_training_there(
    stack_run, every_item_data
):
    """The session's stack recommends for the users of another prepared data set: items
    matched by title take the stack's CF and joint embeddings, the others enter by their text
    alone (z = enc_T(q)); x_u is the stack's CF model over the matched history."""
    from collections import Counter

    import torch

    from allmrec.data.prepared import load_prepared
    from allmrec.distributed.evaluate import evaluate_stack
    from allmrec.training.stage2 import load_trained_stage2
    from allmrec.transfer import match_items, title_keys, transferred_inputs

    mapping = match_items(stack_run, every_item_data)
    matched = mapping > 0
    # ML-100K's 1,682 items: the stack's 1,349 by title and year, but for the few titles that
    # name two of its items (those match nothing: an item is matched only to the one it
    # certainly is); the rest new to it
    source_keys, target_keys = title_keys(stack_run), title_keys(every_item_data)
    once = {k for k, n in Counter(source_keys[1:]).items() if n == 1}
    once -= {"|", "no title|"}  # placeholders name no title
    expected = [source_keys.index(k) if k in once else 0 for k in target_keys[1:]]
    assert mapping[1:].tolist() == expected
    assert matched[1:].sum() >= 1300 and (~matched[1:]).sum() >= 300
    _, source = load_trained_stage2(stack_run)
    inputs = transferred_inputs(stack_run, source, every_item_data, "{title}")
    rows = torch.as_tensor(mapping)
    assert torch.equal(inputs.z[matched], source.z[rows[matched]])
    assert torch.equal(inputs.counts[matched], source.counts[rows[matched]])
    unmatched = np.flatnonzero(~matched[1:]) + 1
    assert (inputs.counts[unmatched] == 0).all() and set(inputs.z_source[unmatched]) == {"text"}
    assert torch.allclose(inputs.z[unmatched], inputs.z_text[unmatched])
    assert not torch.allclose(inputs.z[unmatched], torch.zeros_like(inputs.z[unmatched]))
    target = load_prepared(every_item_data)
    user = int(target.eval_users("test")[0])
    max_len = source.cf_model.config.max_len
    history = target.history(user, "test")[-max_len:]  # the window the CF model reads
    in_source = torch.as_tensor(mapping[history][mapping[history] > 0])
    with torch.no_grad():
        direct = source.cf_model.user_representation(
            torch.tensor([user]),
            torch.nn.functional.pad(in_source, (max_len - len(in_source), 0))[None],
        )
        mapped = inputs.cf_model.user_representation(
            torch.tensor([user]),
            torch.nn.functional.pad(torch.as_tensor(history), (max_len - len(history), 0))[None],
        )
    assert torch.allclose(direct, mapped)

    overrides = [
        "evaluate.max_users=8",
        "evaluate.generation=false",
        "evaluate.llm_only=false",
        f"evaluate.cross_domain=[{every_item_data}]",
    ]
    evaluate_stack(load_config(["configs/ml-100k-cpu.yaml"], overrides), stack_run)
    results = json.loads((stack_run / "eval" / "results.json").read_text())
    [(name, cross)] = results["sections"].items()
    assert name.startswith("cross-domain") and len(cross) == 8
    assert all(target.roles[r["user"]] == "train" for r in cross)
    assert {"A-LLMRec (rank)", "A-LLMRec (SBERT)", "CF backbone (sasrec)", "Text (MiniLM)"} <= set(
        results["tables"][name]
    )
    assert "with no training on them" in results["definitions"][name]
    # the rows rank the target's own candidates: its items, its users' held-out ones
    for record in cross:
        assert record["true_item"] == target.test[record["user"]]
        assert max(record["candidates"]) <= target.num_items
