"""The content path of the text-aware readout (allmrec.models.content)."""

from __future__ import annotations

import numpy as np
import torch

from allmrec.models.content import ContentTower, fit_content_tower, transitions
from allmrec.models.projection import right_aligned
from allmrec.models.readout import RankReadout, TextInputs, text_cosine

GENRES, PER_GENRE, D_TEXT = 6, 20, 16


def _catalogue(seed: int = 0):
    """Items 1..120 in 6 genres, q_i = the genre's direction + noise; in each genre the
    first half is seen in training, the second half never (cold: text is all there is)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(GENRES, D_TEXT, generator=gen), dim=-1)
    genre = torch.arange(GENRES * PER_GENRE) // PER_GENRE
    q = directions[genre] + 0.1 * torch.randn(len(genre), D_TEXT, generator=gen)
    q = torch.cat([torch.zeros(1, D_TEXT), q])  # row 0: padding
    genre = torch.cat([torch.tensor([-1]), genre])
    seen = torch.cat([torch.tensor([False]), (torch.arange(len(genre) - 1) % PER_GENRE) < 10])
    return q, genre, seen


def _walk(rng, genre, pool, length):
    """A user who moves on to the next genre after each item (g, g+1, g+2, ...)."""
    g = int(rng.integers(GENRES))
    items = []
    for _ in range(length):
        choices = np.flatnonzero(pool & (genre.numpy() == g))
        items.append(int(rng.choice(choices)))
        g = (g + 1) % GENRES
    return np.array(items)


def test_transitions_are_every_position_with_its_left_padded_window():
    histories, targets = transitions([np.array([5, 6, 7]), np.array([9, 4])], window=2)
    assert histories.tolist() == [[0, 5], [5, 6], [0, 9]]
    assert targets.tolist() == [6, 7, 4]


def test_the_content_path_ranks_never_seen_items_from_their_text_where_the_cosine_cannot():
    """What follows a user's history here is the next genre, which the cosine to the
    history's text (the same genre) cannot say. Trained on sequences of seen items only, the
    content path ranks held-out items that no sequence contained, from their text alone."""
    q, genre, seen = _catalogue()
    rng = np.random.default_rng(0)
    sequences = [_walk(rng, genre, seen.numpy(), 8) for _ in range(300)]
    torch.manual_seed(0)
    tower = ContentTower(D_TEXT, dim=16, window=4, hidden=32)
    fitted = fit_content_tower(tower, q, sequences, epochs=30, lr=1e-2, batch_size=256)
    assert fitted["content_transitions"] == 300 * 7

    cold = (~seen).numpy() & (genre.numpy() >= 0)
    histories, candidates = [], []
    for _ in range(200):
        walk = _walk(rng, genre, seen.numpy(), 4)
        next_genre = (int(genre[walk[-1]]) + 1) % GENRES
        true = rng.choice(np.flatnonzero(cold & (genre.numpy() == next_genre)))
        others = np.flatnonzero(cold & (genre.numpy() != next_genre))
        histories.append(q[torch.as_tensor(walk)])
        candidates.append([true, *rng.choice(others, 19, replace=False)])
    history = right_aligned(histories)
    items = q[torch.as_tensor(np.array(candidates))]
    with torch.no_grad():
        content = torch.einsum("bd,bcd->bc", tower.users(history), tower.items(items))
    cosine = text_cosine(history, items)
    hit_content = (content.argmax(1) == 0).float().mean()
    hit_cosine = (cosine.argmax(1) == 0).float().mean()
    assert hit_content > 0.8, hit_content
    assert hit_cosine < 0.2, hit_cosine


def test_the_user_side_reads_the_most_recent_items_and_skips_absent_rows():
    torch.manual_seed(0)
    tower = ContentTower(D_TEXT, dim=8, window=3, hidden=16)
    q = torch.randn(5, D_TEXT)
    with torch.no_grad():
        tower.user_tower.recency.copy_(torch.tensor([0.0, 1.0, 2.0]))
        long = tower.users(q[None])  # five rows: the last three count
        last_three = tower.users(q[None, 2:])
        padded = tower.users(right_aligned([q[2:], torch.zeros(0, D_TEXT)]))
    torch.testing.assert_close(long, last_three)
    torch.testing.assert_close(padded[:1], last_three)
    # a shorter history is weighed by the weights of the most recent positions
    with torch.no_grad():
        two = tower.users(right_aligned([q[3:], q]))[0]
        alone = tower.users(q[None, 3:])[0]
    torch.testing.assert_close(two, alone)


def test_a_content_readout_starts_as_its_content_path_and_saves_it():
    """At the start (the LLM's corrections zero) the content readout's text scores are the
    content path's <c_u, f(q_i)> / sigma; its tower and sigma are part of its state (the
    stack's safetensors), its tower is not trained with the LLM."""
    torch.manual_seed(0)
    readout = RankReadout(
        "user_item_text", 12, 4, 4, d_text=D_TEXT, text_path="content", content_dim=8
    )
    assert not any(p.requires_grad for p in readout.content.parameters())
    assert readout.ignores_states
    # fit_content_tower trains a frozen tower (under no_grad too) and leaves it frozen
    before = readout.content.item_tower[0].weight.clone()
    with torch.no_grad():
        fit_content_tower(readout.content, torch.randn(9, D_TEXT), [np.arange(1, 9)], epochs=2)
    assert not torch.equal(before, readout.content.item_tower[0].weight)
    assert not any(p.requires_grad for p in readout.content.parameters())
    history = right_aligned([torch.randn(3, D_TEXT), torch.randn(5, D_TEXT)])
    items = torch.randn(2, 6, D_TEXT)
    text = TextInputs(history, items, torch.zeros(2, 6, dtype=torch.long))
    x_u, z = torch.randn(2, 4), torch.randn(2, 6, 4)
    readout.content_scale.fill_(2.0)
    with torch.no_grad():
        _, scores = readout.path_scores(readout.start_query(x_u, text), z, text)
        expected = torch.einsum(
            "bd,bcd->bc", readout.content.users(history), readout.content.items(items)
        )
        by_state = readout.path_scores(readout.user_query(torch.zeros(2, 12), x_u, text), z, text)
    torch.testing.assert_close(scores, expected / 2)
    torch.testing.assert_close(by_state[1], scores)
    state = readout.state_dict()
    assert float(state["content_scale"]) == 2.0
    assert "content.item_tower.0.weight" in state
    copy = RankReadout(
        "user_item_text", 12, 4, 4, d_text=D_TEXT, text_path="content", content_dim=8
    )
    copy.load_state_dict(state)
    with torch.no_grad():
        again = copy.path_scores(copy.start_query(x_u, text), z, text)[1]
    torch.testing.assert_close(again, scores)


def test_a_tower_that_reads_counts_ranks_new_items_by_what_the_history_buckets_say():
    """Users who follow rare items next pick a rare one, users of popular items a popular one;
    q is noise. Given items none of them trained on, a tower that reads the count buckets
    ranks the right kind first for each user; one that reads q alone cannot tell them apart.
    A stack's weights say that its tower reads counts (`text_options`, `text_width`)."""
    from allmrec.config import Config
    from allmrec.training.stage2 import text_options, text_width

    gen = torch.Generator().manual_seed(0)
    n_items = 60  # 1-30 rare (2 interactions), 31-60 popular (300); q carries nothing
    q = torch.cat([torch.zeros(1, D_TEXT), torch.randn(n_items, D_TEXT, generator=gen)])
    counts = torch.tensor([0] + [2] * 30 + [300] * 30)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 31, size=8) for _ in range(60)]
    sequences += [rng.integers(31, 61, size=8) for _ in range(60)]
    new_q = torch.randn(20, D_TEXT, generator=gen)  # unseen items: 10 rare, 10 popular
    new_counts = torch.tensor([1] * 10 + [400] * 10)
    rare_history = torch.arange(1, 11)[None]
    popular_history = torch.arange(31, 41)[None]

    def rare_first(tower: ContentTower) -> tuple[float, float]:
        """The share of (rare, popular) new pairs each user orders as its kind says."""
        with torch.no_grad():
            keys = tower.items(new_q, new_counts if tower.reads_counts else None)
            shares = []
            for history, sign in ((rare_history, 1.0), (popular_history, -1.0)):
                hc = counts[history] if tower.reads_counts else None
                s = (tower.users(q[history], hc) @ keys.T)[0]
                shares.append(float((sign * (s[:10, None] - s[None, 10:]) > 0).float().mean()))
        return shares[0], shares[1]

    torch.manual_seed(0)
    reading = ContentTower(D_TEXT, dim=8, window=5, hidden=32, counts=True)
    fit_content_tower(reading, q, sequences, epochs=30, batch_size=64, counts=counts)
    torch.manual_seed(0)
    blind = ContentTower(D_TEXT, dim=8, window=5, hidden=32)
    fit_content_tower(blind, q, sequences, epochs=30, batch_size=64)
    assert min(rare_first(reading)) > 0.9
    assert min(rare_first(blind)) < 0.75
    with np.testing.assert_raises(ValueError):
        reading.items(new_q)  # a tower that reads counts needs them

    readout = RankReadout(
        "user_item_text", 12, 4, 4, d_text=D_TEXT, text_path="content", content_counts=True
    )
    weights = {f"readout.{k}": v for k, v in readout.state_dict().items()}
    assert text_width(weights) == D_TEXT
    assert text_options(Config(), weights)["content_counts"] is True
    # a stack saved before the buckets: completed as a tower of q alone, which loads as one
    old = RankReadout("user_item_text", 12, 4, 4, d_text=D_TEXT, text_path="content")
    state = {k: v for k, v in old.state_dict().items() if k != "content.count_buckets"}
    state = ContentTower.completed(state, "content.")
    weights = {f"readout.{k}": v for k, v in state.items()}
    assert text_options(Config(), weights)["content_counts"] is False
    assert text_width(weights) == D_TEXT
    loaded = RankReadout(
        "user_item_text", 12, 4, 4, d_text=D_TEXT, **text_options(Config(), weights)
    )
    loaded.load_state_dict(state)  # strict: every key, no other
    assert not loaded.content.reads_counts
