"""The evaluator on hand-computed cases: ranks with ties, HR/NDCG, and the seeded negatives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from allmrec.evaluation import metrics_from_ranks, ranks_of_true, sample_candidates


def test_ranks_count_the_candidates_scored_above_the_true_one():
    scores = np.array([[0.9, 0.1, 0.2, 0.3], [0.4, 0.9, 0.5, 0.2], [0.5, 0.6, 0.7, 0.8]])
    assert ranks_of_true(scores).tolist() == [0, 2, 3]


def test_ties_are_broken_at_a_seeded_random_place_among_them():
    scores = np.zeros((4000, 5))  # the true item ties with all 4 negatives
    ranks = ranks_of_true(scores, seed=3)
    assert np.array_equal(ranks, ranks_of_true(scores, seed=3))  # seeded
    assert not np.array_equal(ranks, ranks_of_true(scores, seed=4))
    counts = np.bincount(ranks, minlength=5) / len(ranks)
    assert counts == pytest.approx([0.2] * 5, abs=0.03)  # every place among the ties alike
    # ties with some negatives only: never above the strictly better ones
    mixed = np.array([[1.0, 2.0, 1.0, 0.0]] * 1000)
    assert set(ranks_of_true(mixed, seed=0).tolist()) == {1, 2}


def test_hit_and_ndcg_on_hand_computed_ranks():
    m = metrics_from_ranks(np.array([0, 1, 4, 10]), ks=(1, 5, 10))
    assert m["hit@1"] == 0.25 and m["hit@5"] == 0.75 and m["hit@10"] == 0.75
    # NDCG@5: 1/log2(rank + 2) for the hits 0, 1 and 4: (1 + 1/log2(3) + 1/log2(6)) / 4
    assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert m["ndcg@10"] == m["ndcg@5"] and m["users"] == 4 and "ndcg@1" not in m


def _data(num_items: int, seen: dict[int, list[int]], test: dict[int, int]):
    return SimpleNamespace(
        num_items=num_items,
        targets=lambda split: test,
        interacted=lambda user: np.array(seen[user]),
    )


def test_negatives_are_seeded_unique_and_never_the_users_own_items():
    seen = {1: list(range(1, 40)), 2: [5, 6, 7]}  # user 1 has seen items 1..39 of 60
    data = _data(60, seen, test={1: 39, 2: 7})
    out = sample_candidates(data, np.array([1, 2]), "test", num_negatives=19, seed=42)
    assert out[:, 0].tolist() == [39, 7]  # the held-out item first
    for row, user in enumerate((1, 2)):
        negatives = out[row, 1:].tolist()
        assert len(set(negatives)) == 19 and not set(negatives) & set(seen[user])
        assert all(1 <= i <= 60 for i in negatives)  # 0 is padding, never an item
    again = sample_candidates(data, np.array([2, 1]), "test", num_negatives=19, seed=42)
    assert again[0].tolist() == out[1].tolist()  # seeded per (seed, user): order-free
    other = sample_candidates(data, np.array([1]), "test", num_negatives=19, seed=43)
    assert other[0, 1:].tolist() != out[0, 1:].tolist()
    with pytest.raises(ValueError, match="cannot sample 19"):
        sample_candidates(_data(45, seen, {1: 39}), np.array([1]), "test", 19, seed=0)


def test_progress_rates_each_phase_from_its_own_start(caplog):
    """The evaluation's one progress line per phase: the LLM-only rows' rate counts from
    their own start, not from the A-LLMRec rows' (which printed 0.01/s for a phase at 3/s)."""
    import logging
    import re
    import time

    from allmrec.llm_evaluation import Progress

    progress = Progress("evaluate", every=0.0)
    with caplog.at_level(logging.INFO, logger="allmrec.llm_evaluation"):
        progress(1, 2)
        time.sleep(0.5)
        progress(2, 2)  # the first phase: 2 prompts in about 0.5 s
        progress(1, 4)
        progress(4, 4)  # the second: 4 prompts at once
        progress(1, 4)
        time.sleep(0.5)
        progress(4, 4)  # a third with as many prompts as the second, in about 0.5 s
        progress(1, 4)
        progress(4, 4)  # a fourth, as many again, at once: its count starts again
    rates = [float(m) for m in re.findall(r"\(([\d.]+)/s\)", caplog.text)]
    assert len(rates) == 8 and rates[1] < 5 and rates[5] < 10
    assert rates[3] > 50 and rates[7] > 50
