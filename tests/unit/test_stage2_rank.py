"""The `rank` objective of Stage 2 without Ray: the listwise loss, the readouts, truncated
forwards, training targets, and the paired differences of the evaluation table.

The LLM is a tiny random Llama with SmolLM2's real tokenizer (`build_small_llm`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from allmrec.config import load_config
from allmrec.llm import add_special_tokens, build_small_llm, first_layers
from allmrec.llm_evaluation import (
    BYPASS_ROW,
    RANK_ROW,
    _rank_rows,
    catalogue_rank,
    paired_difference,
    paired_differences,
    summarize,
)
from allmrec.models.projection import ALLMRecLM, Stage2Example
from allmrec.models.readout import RankReadout, listwise_loss
from allmrec.prompts import build_prompt
from allmrec.training.stage2 import EvalCase, projector_state, training_targets

D_CF, D_JOINT = 8, 16


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_small_llm(hidden=64, layers=2, heads=4)
    add_special_tokens(model, tokenizer)
    return model, tokenizer


def _rank_model(tiny, readout: str, **kwargs) -> ALLMRecLM:
    torch.manual_seed(0)
    llm, tokenizer = tiny
    return ALLMRecLM(llm, tokenizer, D_CF, D_JOINT, objective="rank", readout=readout, **kwargs)


def test_listwise_loss_on_hand_made_scores():
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    by_hand = -(
        math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.e / (1 + math.e + math.e**3))
    )
    assert float(listwise_loss(scores, targets)) == pytest.approx(by_hand / 2, rel=1e-6)
    # Padding (-inf) takes no probability mass: one real candidate is a sure pick.
    padded = torch.tensor([[5.0, float("-inf"), float("-inf")]])
    assert float(listwise_loss(padded, torch.tensor([0]))) == pytest.approx(0.0, abs=1e-7)
    # The loss falls as the true candidate's score rises.
    higher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 3.0]])
    assert listwise_loss(higher, targets) < listwise_loss(scores, targets)
    with pytest.raises(ValueError, match="expected"):
        listwise_loss(scores, torch.tensor([0]))


def test_first_layers_equals_the_full_models_state_at_that_block(tiny):
    llm, _ = tiny
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = llm.base_model(input_ids=ids, output_hidden_states=True)
        with first_layers(llm, 1):
            truncated = llm.base_model(input_ids=ids).last_hidden_state
        again = llm.base_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(truncated, llm.base_model.norm(full.hidden_states[1]))
    torch.testing.assert_close(again, full.last_hidden_state)  # restored afterwards
    assert len(llm.base_model.layers) == llm.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="readout_layer 3"):
        with first_layers(llm, 3):
            pass


def test_rank_batch_holds_each_rows_candidates_and_target(tiny):
    lm = _rank_model(tiny, "candidate")
    z = torch.randn(12, D_JOINT)
    titles = {i: f"Movie {i}" for i in range(12)}
    examples = [
        Stage2Example(build_prompt([1, 2], [5, 3, 4], titles), torch.randn(D_CF), z, None, 3),
        Stage2Example(build_prompt([6], [8, 7], titles), torch.randn(D_CF), z, None, 8),
    ]
    batch = lm.collate(examples)
    assert batch.labels is None  # no title is appended for the rank objective
    assert batch.targets.tolist() == [1, 0]
    assert batch.candidate_mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(batch.candidate_vectors[0], z[[5, 3, 4]])
    torch.testing.assert_close(batch.candidate_vectors[1, :2], z[[8, 7]])
    scores = lm.candidate_scores(batch)
    assert scores.shape == (2, 3) and torch.isinf(scores[1, 2]) and scores[1, :2].isfinite().all()
    with pytest.raises(ValueError, match="not among the candidates"):
        lm.collate([Stage2Example(examples[0].prompt, torch.randn(D_CF), z, None, 9)])


@pytest.mark.parametrize("readout", ["candidate", "user_item"])
def test_rank_training_learns_what_only_the_injected_history_reveals(tiny, readout):
    """Every title is the same; each item has one of 4 classes written into its z_i; the true
    candidate is the one sharing the class of the history item. Only the LLM sees the history
    item (its [HistoryEmb]): the readout must learn it through the LLM, and the bypass, which
    sees x_u (noise here) and z_c only, cannot beat chance (0.25)."""
    lm = _rank_model(tiny, readout)
    n_items, n_cand = 60, 4
    generator = torch.Generator().manual_seed(1)
    classes = np.arange(n_items) % n_cand
    z = 0.3 * torch.randn(n_items, D_JOINT, generator=generator)
    z[torch.arange(n_items), torch.as_tensor(classes)] += 3.0
    titles = dict.fromkeys(range(n_items), "Movie")

    def examples(count: int, rng: np.random.Generator) -> list[Stage2Example]:
        out = []
        for _ in range(count):
            h = int(rng.integers(n_items))
            pool = [np.flatnonzero((classes == k) & (np.arange(n_items) != h)) for k in range(4)]
            candidates = [int(rng.choice(pool[k])) for k in rng.permutation(n_cand)]
            true = next(c for c in candidates if classes[c] == classes[h])
            x_u = torch.randn(D_CF, generator=generator)
            out.append(Stage2Example(build_prompt([h], candidates, titles), x_u, z, None, true))
        return out

    held_out = lm.collate(examples(200, np.random.default_rng(99)))

    def hit_at_1() -> tuple[float, float]:
        lm.eval()
        with torch.no_grad():
            readout_hit = lm.candidate_scores(held_out).argmax(1) == held_out.targets
            bypass_hit = lm.bypass(held_out).argmax(1) == held_out.targets
        lm.train()
        return float(readout_hit.float().mean()), float(bypass_hit.float().mean())

    optimizer = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=3e-3)
    rng = np.random.default_rng(0)
    before, losses = hit_at_1(), []
    for _ in range(200):
        out = lm(lm.collate(examples(16, rng)))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["rank"].detach()))
    after = hit_at_1()
    assert before[0] < 0.45
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after[0] > 0.8, f"readout Hit@1 {after[0]:.2f} after training (chance 0.25)"
    assert after[1] < 0.4, f"the bypass cannot see the history, yet Hit@1 {after[1]:.2f}"
    # Only what Stage 2 trains is in its state: never the LLM.
    assert all(not k.startswith("llm.") for k in projector_state(lm))
    assert {k.split(".")[0] for k in projector_state(lm)} == {
        "user_projector",
        "item_projector",
        "readout",
        "bypass",
    }


def test_user_item_readout_starts_at_the_cf_models_ranking():
    generator = torch.Generator().manual_seed(0)
    e = torch.randn(30, D_CF, generator=generator)  # CF item embeddings, row 0 padding
    e[0] = 0
    encoder = torch.nn.Linear(D_CF, D_JOINT)
    z = torch.sigmoid(encoder(e)).detach()  # z_i = enc_I(e_i), as Stage 1
    readout = RankReadout("user_item", 64, D_CF, D_JOINT)
    error = readout.fit_item_map(z, e, ridge=1e-6)
    assert error < 0.05
    x_u = torch.randn(4, D_CF, generator=generator)
    h = torch.randn(4, 64, generator=generator)  # whatever the LLM says: A is zero at first
    candidates = torch.arange(1, 21).repeat(4, 1)
    scores = readout(h, torch.zeros(4, 20, 64), x_u, z[candidates])
    cf_scores = torch.einsum("bd,bcd->bc", x_u, e[candidates])
    correlation = torch.corrcoef(torch.stack([scores.flatten(), cf_scores.flatten()]))[0, 1]
    assert correlation > 0.99
    assert torch.equal(scores.argmax(dim=1), cf_scores.argmax(dim=1))
    # The candidate readout has no item map: fitting is a no-op.
    assert math.isnan(RankReadout("candidate", 64, D_CF, D_JOINT).fit_item_map(z, e))


def test_training_targets_last_and_sequence():
    from allmrec.data.prepared import PreparedData

    train = [np.array([], dtype=np.int64), np.arange(1, 8), np.array([3, 4])]
    data = PreparedData(
        None,
        {},
        2,
        10,
        train,
        np.zeros(3),
        np.zeros(3),
        np.zeros(11),
        np.array(["", "train", "train"], dtype=object),
    )
    config = load_config([], ["stage2.examples_per_user=1"])
    assert training_targets(np.array([1, 2]), data, config, epoch=1) == [(1, 6), (2, 1)]
    config = load_config([], ["stage2.examples_per_user=3"])
    # the last three; a two-item sequence has one target, repeated to keep 3 per user
    assert training_targets(np.array([1, 2]), data, config, 1) == [
        (1, 6),
        (1, 5),
        (1, 4),
        (2, 1),
        (2, 1),
        (2, 1),
    ]
    config = load_config([], ["stage2.examples_per_user=3", "stage2.targets=sequence"])
    first = training_targets(np.array([1, 2]), data, config, epoch=1)
    assert len(first) == 6 and len({c for u, c in first if u == 1}) == 3
    assert all(1 <= c < len(train[u]) for u, c in first)
    # A user's targets depend on (seed, epoch, user), not on the other users of the shard.
    assert training_targets(np.array([1]), data, config, 1) == first[:3]
    assert training_targets(np.array([1]), data, config, 2) != first[:3]


def _record(user: int, ranks: dict) -> dict:
    return {"user": user, "ranks": ranks, "catalogue_ranks": {}, "generated": {}}


def test_paired_difference_and_its_bootstrap_interval():
    cf = "CF backbone (sasrec)"
    # 60 users: the rank row hits on 40, the CF backbone on 20 (10 of them shared).
    records = []
    for u in range(60):
        rank_hit = u < 40
        cf_hit = 30 <= u < 50
        records.append(
            _record(u, {RANK_ROW: 0 if rank_hit else 3, cf: 0 if cf_hit else 1, BYPASS_ROW: 2})
        )
    d = paired_difference(records, RANK_ROW, cf, seed=0)
    assert d["difference"] == pytest.approx((40 - 20) / 60)
    assert d["wins"] == 30 and d["losses"] == 10 and d["users"] == 60
    assert d["low"] < d["difference"] < d["high"] and d["low"] > 0
    # Identical rows: a zero difference and a zero-width interval.
    same = paired_difference(records, RANK_ROW, RANK_ROW)
    assert same["difference"] == same["low"] == same["high"] == 0
    both = paired_differences(records)
    assert [x["baseline"] for x in both] == [cf, BYPASS_ROW]
    assert paired_differences([_record(0, {cf: 0})]) == []


def test_summary_rows_over_their_own_users_and_catalogue_ranks():
    records = [_record(u, {"Popularity": u % 3}) for u in range(6)]
    for r in records[:2]:
        r["ranks"]["LLM-only (likelihood)"] = 0
    records[0]["catalogue_ranks"]["Popularity"] = 4
    records[1]["catalogue_ranks"]["Popularity"] = 20
    table = summarize(records)
    assert table["Popularity"]["users"] == 6 and table["LLM-only (likelihood)"]["users"] == 2
    assert table["LLM-only (likelihood)"]["hit@1"] == 1.0
    assert table["Popularity"]["full_hit@10"] == 0.5
    case = EvalCase(1, np.array([5, 9, 8]), np.array([2, 3]), torch.zeros(D_CF), [5, 9, 8])
    scores = np.array([100.0, 0, 9, 8, 7, 6, 5, 4, 3, 2])  # by item id; 0 is padding
    # The true item 5 scores 6.0; 0 (padding), 2 and 3 (history) are left out: only 4 beats it.
    assert catalogue_rank(scores, case) == 1


@pytest.mark.parametrize("readout", ["user_item", "user_item_text"])
def test_a_readout_at_its_start_scores_the_same_without_the_llm_pass(tiny, readout):
    """At Stage 2's start A(h) (and T(h)) are zero for every h: `run_llm=False` gives the
    same scores and query with no LLM pass, and the evaluator's rows make none; after one
    optimizer step the states matter and scoring without them is refused. (The tiny LLM is
    shared by every model here: the hook counts the passes of each.)"""
    d_text = 6
    lm = _rank_model(tiny, readout, d_text=d_text if readout == "user_item_text" else None)
    generator = torch.Generator().manual_seed(2)
    z, q = torch.randn(12, D_JOINT, generator=generator), torch.randn(12, d_text)
    counts = torch.arange(12) * 7
    titles = {i: f"Movie {i}" for i in range(12)}
    text = {"item_text": q, "item_counts": counts} if readout == "user_item_text" else {}
    x_u = torch.randn(2, D_CF, generator=generator)
    examples = [
        Stage2Example(build_prompt([1, 2], [5, 3, 4], titles), x_u[0], z, None, 3, **text),
        Stage2Example(build_prompt([6], [8, 7], titles), x_u[1], z, None, 8, **text),
    ]
    batch = lm.collate(examples)
    passes = []
    hook = lm.llm.base_model.register_forward_hook(lambda *_: passes.append(1))
    lm.eval()
    assert lm.readout.ignores_states
    with torch.no_grad():
        scores, query = lm.rank_forward(batch)
        assert len(passes) == 1
        idle_scores, idle_query = lm.rank_forward(batch, run_llm=False)
    assert len(passes) == 1  # no second LLM pass
    assert torch.equal(idle_scores, scores) and torch.equal(idle_query, query)

    lm.train()
    optimizer = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    lm(batch)["loss"].backward()
    optimizer.step()
    assert not lm.readout.ignores_states
    with pytest.raises(ValueError, match="read the LLM's hidden states"):
        lm.rank_forward(batch, run_llm=False)
    if readout == "user_item_text":  # T(h) alone away from zero still needs the states
        text_only = _rank_model(tiny, readout, d_text=d_text)
        torch.nn.init.constant_(text_only.readout.text_head[1].bias, 0.1)
        assert not text_only.readout.ignores_states

    # the evaluator's rows: no LLM pass at the start, one per batch once A(h), T(h) move
    def evaluated(model) -> list[dict]:
        inputs = SimpleNamespace(
            z=z, z_text=None, q=text.get("item_text"), counts=counts, titles=titles
        )
        cases = [
            EvalCase(u, np.array(c), np.array(h), x_u[u], list(c))
            for u, (h, c) in enumerate([([1, 2], [3, 5, 4]), ([6], [8, 7, 9])])
        ]
        records = [
            {"true_item": int(c.candidates[0]), "ranks": {}, "catalogue_ranks": {}} for c in cases
        ]
        model.eval()
        _rank_rows(model, inputs, cases, records, load_config(), None, sbert=False)
        return records

    passes.clear()
    moved = evaluated(lm)
    assert len(passes) == 1 and {RANK_ROW, BYPASS_ROW} <= set(moved[0]["ranks"])
    at_start = _rank_model(tiny, readout, d_text=d_text if readout == "user_item_text" else None)
    passes.clear()
    records = evaluated(at_start)
    assert passes == [] and {RANK_ROW, BYPASS_ROW} <= set(records[0]["ranks"])
    hook.remove()
    # the candidate readout always reads the states
    assert not _rank_model(tiny, "candidate").readout.ignores_states
