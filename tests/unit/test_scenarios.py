"""The paper's scenarios (docs/method.md, section 4): the 35% item split, the users that are
trained on (cold users held out, the few-shot K), and a text-aware readout that recovers cold
items from their text where the CF model cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allmrec.data.prepare import ROLE_COLD, ROLE_TRAIN, ROLE_UNSEEN, popularity_sections, user_roles
from allmrec.data.prepared import COLD_USER_SPLIT, PreparedData


def test_the_35_percent_split_by_training_interactions_with_ties_on_the_boundary():
    # 10 items: ceil(3.5) = 4 a section. Ranked: 0 1 1 2 | 3 | 5 5 5 8 13.
    counts = np.array([5, 0, 13, 1, 3, 5, 2, 8, 1, 5])
    cold, warm, rule = popularity_sections(counts, 0.35)
    assert rule["cold_max_interactions"] == 2 and rule["warm_min_interactions"] == 5
    assert np.flatnonzero(cold).tolist() == [1, 3, 6, 8]  # counts 0, 1, 2, 1
    # the 4th from the top is a 5: every item tied with it is warm too (5 items, not 4)
    assert np.flatnonzero(warm).tolist() == [0, 2, 5, 7, 9]
    assert np.flatnonzero(~cold & ~warm).tolist() == [4]  # the middle: the 3
    # ties at the cold boundary: the 4th from the bottom is a 1, shared by 3 more items
    cold, warm, rule = popularity_sections(np.array([1, 1, 1, 1, 1, 1, 4, 9, 9, 9]), 0.35)
    assert cold.tolist() == [True] * 6 + [False] * 4 and rule["cold_max_interactions"] == 1
    assert warm.tolist() == [False] * 6 + [True] * 4  # the 4th from the top is the 4
    # all tied: every item is cold, none is both
    cold, warm, _ = popularity_sections(np.full(6, 7), 0.35)
    assert cold.all() and not warm.any()
    # the older label, as a setting: fewer than the threshold cold, the rest warm
    cold, warm, rule = popularity_sections(counts, 0.35, threshold=3)
    assert np.flatnonzero(cold).tolist() == [1, 3, 6, 8] and (warm == ~cold).all()
    assert rule["rule"] == "fewer than 3 training interactions"


def test_user_roles_hold_out_seeded_cold_users_and_deal_the_few_shot_k():
    per_user = np.array([0] + [2] * 10 + [20] * 190)  # users 1..10 have 2 interactions
    roles = user_roles(per_user, cold_share=0.1, few_shot=None, seed=42)
    assert roles[0] == "" and (roles[1:] != "").all()
    cold = np.flatnonzero(roles == ROLE_COLD)
    assert len(cold) == 20 and cold.min() > 10  # never a user without a third interaction
    assert (roles[1:] != ROLE_UNSEEN).all()
    assert (user_roles(per_user, 0.1, None, seed=42) == roles).all()  # seeded
    assert (user_roles(per_user, 0.1, None, seed=43) != roles).any()
    k256 = user_roles(per_user, cold_share=0.1, few_shot=50, seed=42)
    k128 = user_roles(per_user, cold_share=0.1, few_shot=25, seed=42)
    assert (np.flatnonzero(k256 == ROLE_COLD) == cold).all()  # the same cold users
    assert (k256 == ROLE_TRAIN).sum() == 50 and (k128 == ROLE_TRAIN).sum() == 25
    assert set(np.flatnonzero(k128 == ROLE_TRAIN)) <= set(np.flatnonzero(k256 == ROLE_TRAIN))
    assert (k256 == ROLE_UNSEEN).sum() == 200 - 20 - 50
    with pytest.raises(ValueError, match="few_shot_users=500"):
        user_roles(per_user, 0.1, 500, seed=42)
    with pytest.raises(ValueError, match="cold_user_share=0.99"):
        user_roles(per_user, 0.99, None, seed=42)


def _data(roles: list[str]) -> PreparedData:
    """Three users of 6 interactions each (train 4, valid, test)."""
    n = len(roles)
    train = [np.zeros(0, dtype=np.int64)] + [np.arange(1, 5) + 10 * u for u in range(1, n + 1)]
    valid = np.array([0] + [5 + 10 * u for u in range(1, n + 1)])
    test = np.array([0] + [6 + 10 * u for u in range(1, n + 1)])
    counts = np.zeros(10 * n + 10)
    return PreparedData(
        None, {}, n, 10 * n + 9, train, valid, test, counts, np.array(["", *roles], dtype=object)
    )


def test_training_and_evaluated_users_follow_the_roles():
    data = _data([ROLE_TRAIN, ROLE_COLD, ROLE_TRAIN])
    # every stage trains on data.training_users(): the held-out cold user is never among them
    assert data.training_users().tolist() == [1, 3]
    assert data.eval_users("valid").tolist() == [1, 3]
    assert data.eval_users("test").tolist() == [1, 3]
    assert data.eval_users(COLD_USER_SPLIT).tolist() == [2]
    # a cold user: the first two interactions as history, the third as the target
    assert data.history(2, COLD_USER_SPLIT).tolist() == [21, 22]
    assert data.targets(COLD_USER_SPLIT).tolist() == [0, 0, 23, 0]
    few = _data([ROLE_TRAIN, ROLE_UNSEEN, ROLE_COLD, ROLE_UNSEEN])
    assert few.few_shot and few.training_users().tolist() == [1]
    assert few.eval_users("valid").tolist() == [1]  # model selection within the K
    assert few.eval_users("test").tolist() == [2, 4]  # tested outside the K


def test_the_text_aware_readout_recovers_cold_items_the_cf_model_cannot_rank():
    """A synthetic catalogue: 150 warm items whose CF embeddings carry the users' taste, 150
    cold ones whose CF embeddings are near zero (seen too rarely to learn); every item's text
    carries its taste. The user_item_text readout, its gate fitted as Stage 2 fits it
    (`fit_gate`, before any LLM step), ranks the cold held-out items far better than the CF
    model, and keeps at least the CF model's level on warm ones."""
    from allmrec.models.readout import RankReadout, TextInputs, history_lengths

    gen = torch.Generator().manual_seed(0)
    n_items, d, d_text = 300, 8, 16
    warm = torch.arange(n_items) < 150
    counts = torch.where(warm, torch.tensor(200), torch.tensor(3))
    taste = torch.nn.functional.normalize(torch.randn(n_items, d_text, generator=gen), dim=-1)
    project = torch.randn(d_text, d, generator=gen) / d_text**0.5
    e = torch.where(
        warm[:, None], 0.5 * taste @ project, 0.05 * torch.randn(n_items, d, generator=gen)
    )
    q = taste + 0.1 * torch.randn(n_items, d_text, generator=gen)

    def examples(n: int, cold_share: float):
        users = torch.nn.functional.normalize(torch.randn(n, d_text, generator=gen), dim=-1)
        affinity = users @ taste.T
        history = affinity.topk(5, dim=1).indices  # what the user already liked
        true_cold = torch.rand(n, generator=gen) < cold_share
        pool = torch.where(true_cold[:, None], ~warm, warm).float()
        masked = torch.where(pool > 0, affinity, torch.tensor(-9.0))
        masked.scatter_(1, history, -9.0)
        true = masked.argmax(dim=1)
        negatives = torch.stack([torch.randperm(n_items, generator=gen)[:19] for _ in range(n)])
        candidates = torch.cat([true[:, None], negatives], dim=1)
        x_u = 4 * users @ project  # the CF model's user vector
        text = TextInputs(q[history], q[candidates], counts[candidates])
        return x_u, candidates, text, true_cold

    readout = RankReadout("user_item_text", d_llm=4, d_cf=d, d_joint=d, d_text=d_text)
    readout.fit_item_map(torch.cat([torch.zeros(1, d), e]), torch.cat([torch.zeros(1, d), e]))
    z = torch.cat([torch.zeros(1, d), e])[1:]  # joint embeddings: here the item path itself

    x_u, candidates, text, _ = examples(600, cold_share=0.3)
    cf, cosine = readout.path_scores(readout.start_query(x_u, text), z[candidates], text)
    fitted = readout.fit_gate(cf, cosine, text.counts, history_lengths(text.history))
    assert fitted["gate_loss_after"] < fitted["gate_loss_before"]

    x_u, candidates, text, true_cold = examples(800, cold_share=0.3)
    with torch.no_grad():
        ours = readout.item_scores(readout.start_query(x_u, text), z[candidates], text)
    cf_only = torch.einsum("bd,bcd->bc", x_u, e[candidates])
    hit_ours = (ours.argmax(dim=1) == 0).float()
    hit_cf = (cf_only.argmax(dim=1) == 0).float()
    assert hit_cf[true_cold].mean() < 0.05  # the CF model cannot rank cold items
    assert hit_ours[true_cold].mean() > hit_cf[true_cold].mean() + 0.15
    assert hit_ours[~true_cold].mean() >= hit_cf[~true_cold].mean() - 0.02
    # and at the start (before the fit) the readout is the CF model's ranking
    fresh = RankReadout("user_item_text", d_llm=4, d_cf=d, d_joint=d, d_text=d_text)
    fresh.fit_item_map(torch.cat([torch.zeros(1, d), e]), torch.cat([torch.zeros(1, d), e]))
    with torch.no_grad():
        start = fresh.item_scores(fresh.start_query(x_u, text), z[candidates], text)
    assert (start.argmax(dim=1) == cf_only.argmax(dim=1)).float().mean() > 0.97


def test_a_training_target_is_counted_without_its_own_interaction():
    """The text-aware readout weighs an item by its training interactions; a training
    target's count holds that very interaction, a held-out item's never does. Counted without
    it, an item seen once is a never-seen item (n = 0, the bucket of items added at serving
    time), so that bucket learns from positives too."""
    from allmrec.llm import add_special_tokens, build_small_llm
    from allmrec.models.projection import Stage2Example, collate_stage2
    from allmrec.prompts import build_prompt

    llm, tokenizer = build_small_llm()
    add_special_tokens(llm, tokenizer)
    titles = [f"Film {i}" for i in range(30)]
    counts = torch.arange(30) % 5  # item 5, 10, ... seen 0 times, item 6 once, ...
    q = torch.randn(30, 8)
    prompt = build_prompt([1, 2], [6, 7, 10], titles)
    trained = Stage2Example(
        prompt, torch.zeros(4), torch.zeros(30, 4), target_item=6, item_text=q, item_counts=counts
    )
    held_out = Stage2Example(
        prompt, torch.zeros(4), torch.zeros(30, 4), item_text=q, item_counts=counts
    )
    assert collate_stage2([trained], tokenizer).text.counts[0].tolist() == [0, 2, 0]
    assert collate_stage2([held_out], tokenizer).text.counts[0].tolist() == [1, 2, 0]


def test_weighting_cold_targets_in_the_gate_fit_lifts_cold_items():
    """Cold items score low on the CF path (seen rarely, their embeddings are small), and
    one target in ten is cold: fitted with every example alike, the gate keeps the CF path's
    ranking; with the users of cold items weighted up (`stage2.gate_cold_weight`) it lifts
    the cold bucket, and the cold targets are ranked first more often."""
    from allmrec.models.readout import RankReadout, count_bucket

    gen = torch.Generator().manual_seed(1)
    n, c = 2000, 20
    cold = torch.rand(n, c, generator=gen) < 0.35  # which candidates are cold items
    true_cold = torch.rand(n, generator=gen) < 0.1
    cold[:, 0] = true_cold  # column 0 is the true item
    cf = torch.randn(n, c, generator=gen) - 1.5 * cold.float()  # the CF path's popularity bias
    cf[:, 0] += 1.0  # it knows the true item somewhat
    counts = torch.where(cold, torch.tensor(3), torch.tensor(300))
    text = torch.zeros(n, c)

    def fitted(weights):
        readout = RankReadout("user_item_text", d_llm=4, d_cf=4, d_joint=4, d_text=4)
        lengths = torch.full((n,), 10)
        readout.fit_gate(cf, text, counts, lengths, weights)
        with torch.no_grad():
            hits = (readout.gated(cf, text, counts, lengths).argmax(dim=1) == 0).float()
        bias = readout.gate.bucket_bias.detach()
        bias = bias - bias[count_bucket(torch.tensor(300))]
        return hits, float(bias[count_bucket(torch.tensor(3))])

    alike, alike_bias = fitted(None)
    weighted, weighted_bias = fitted(torch.where(true_cold, 5.0, 1.0))
    assert weighted_bias > alike_bias + 0.3
    assert weighted[true_cold].mean() > alike[true_cold].mean() + 0.1
    # the same fit as None when every weight is equal
    same, _ = fitted(torch.full((n,), 3.0))
    assert torch.equal(same, alike)


def test_the_automatic_cold_weight_is_the_largest_that_keeps_all_and_warm_users():
    """`gate_cold_weight: auto` scores each weight out of sample (fit on one half, score the
    other) and takes the largest whose paired gain over the CF path, less 1.645 standard
    errors, is above 0 on all examples and above -0.01 on warm ones; here the text lifts
    cold items and costs warm ones as the weight grows, so the choice sits strictly inside
    the grid, and asking for no margin (z = 0) never takes a smaller weight."""
    from allmrec.models.readout import RankReadout
    from allmrec.training.stage2 import GateExamples, choose_cold_weight, top1_hits

    gen = torch.Generator().manual_seed(2)
    n, c = 3000, 20
    cold = torch.rand(n, c, generator=gen) < 0.35
    true_cold = torch.rand(n, generator=gen) < 0.15
    cold[:, 0] = true_cold
    warm = ~true_cold
    cf = torch.randn(n, c, generator=gen) - 1.5 * cold.float()
    cf[:, 0] += torch.where(true_cold, 0.3, 1.6)  # it knows warm items well, cold ones barely
    text = 0.1 * torch.randn(n, c, generator=gen)
    text[:, 0] += 0.05  # a weak text signal, for every item alike
    counts = torch.where(cold, torch.tensor(3), torch.tensor(300))
    readout = RankReadout("user_item_text", d_llm=4, d_cf=4, d_joint=4, d_text=4)
    start = {k: v.clone() for k, v in readout.gate.state_dict().items()}
    grid = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0]
    candidates = torch.zeros(n, c, dtype=torch.long)  # not read by the choice
    lengths, short = torch.full((n,), 10), torch.zeros(n, dtype=torch.bool)
    examples = GateExamples(cf, text, text, counts, candidates, lengths, short)
    weight, table = choose_cold_weight(readout, examples, true_cold, warm, grid, 0)
    # the gate is left as it was
    assert all(torch.equal(v, start[k]) for k, v in readout.gate.state_dict().items())
    cf_row, rows = table[0], {r["weight"]: r for r in table[1:]}
    assert cf_row["all"] == float(top1_hits(cf).float().mean())
    assert sorted(rows) == grid
    # cold items gain with the weight, until they cost all users more than the CF path gives
    assert rows[64.0]["cold"] > rows[1.0]["cold"]
    keeps = [w for w, r in rows.items() if r["all_gain_low"] > 0 and r["warm_gain_low"] > -0.01]
    assert weight == max(keeps)
    assert 1.0 < weight < 64.0, table
    # the margin: each lower bound is below the gain itself, and without it no smaller weight
    assert all(r["all_gain_low"] < r["all"] - cf_row["all"] for r in rows.values())
    bare, _ = choose_cold_weight(readout, examples, true_cold, warm, grid, 0, z=0.0)
    assert bare >= weight


def test_the_gate_learns_how_far_to_trust_the_text_by_history_length():
    """Two kinds of examples on the same items: for users of long histories the text path
    knows the true item (the CF path barely does), for users of two items the text is noise
    and the CF path knows it. One gate fitted on both (`fit_gate` with history lengths)
    keeps each kind's strong path, where a gate without the history's weights must pick one
    trade for both; and a gate fitted on long histories only scores a short one as a long
    one (the buckets without examples share the nearest one's weights)."""
    from allmrec.models.readout import CountGate, RankReadout

    gen = torch.Generator().manual_seed(3)
    n, c = 2000, 20
    counts = torch.full((n, c), 100)
    long_rows = torch.arange(n) < n // 2
    lengths = torch.where(long_rows, 10, 2)
    cf = torch.randn(n, c, generator=gen)
    text = 0.1 * torch.randn(n, c, generator=gen)
    cf[:, 0] += torch.where(long_rows, 0.3, 2.5)
    text[:, 0] += torch.where(long_rows, 0.25, 0.0)
    text[~long_rows] = 0.3 * torch.randn(int((~long_rows).sum()), c, generator=gen)

    def hits(readout, rows):
        with torch.no_grad():
            scores = readout.gated(cf[rows], text[rows], counts[rows], lengths[rows])
        return float((scores.argmax(dim=1) == 0).float().mean())

    readout = RankReadout("user_item_text", d_llm=4, d_cf=4, d_joint=4, d_text=4)
    readout.fit_gate(cf, text, counts, lengths)
    blind = RankReadout("user_item_text", d_llm=4, d_cf=4, d_joint=4, d_text=4)
    blind.fit_gate(cf, text, counts, torch.full((n,), 10))  # every row one bucket
    assert hits(readout, long_rows) > hits(blind, long_rows) + 0.03
    assert hits(readout, ~long_rows) > hits(blind, ~long_rows) + 0.03
    gate = readout.gate
    assert gate.text_by_history[2] / gate.cf_by_history[2] < (
        gate.text_by_history[4] / gate.cf_by_history[4]
    )

    long_only = RankReadout("user_item_text", d_llm=4, d_cf=4, d_joint=4, d_text=4)
    long_only.fit_gate(cf[long_rows], text[long_rows], counts[long_rows], lengths[long_rows])
    for name in ("cf_by_history", "text_by_history", "bias_by_history"):
        weights = getattr(long_only.gate, name).detach()
        assert torch.equal(weights, torch.full_like(weights, float(weights[4])))
    # a gate saved before the history's weights loads at their start (1 each)
    old = {k: v for k, v in CountGate().state_dict().items() if "by_history" not in k}
    restored = CountGate()
    restored.load_state_dict(CountGate.completed(old))
    assert torch.equal(restored.text_by_history, torch.ones(6))
