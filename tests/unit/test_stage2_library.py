"""Stage 2 library: the LLM loader, the prompt, injection, labels, ranking, generation.

The real embedded SmolLM2-135M checks the loader, its tokens and generation; a tiny random Llama
with SmolLM2's real tokenizer (`build_small_llm`) checks the rest quickly. The first run ever
dequantizes the GGUF into the default cache (about 20 to 45 s); later runs read the cache.
"""

from __future__ import annotations

import pytest
import torch

from allmrec.llm import (
    EMBEDDED_LLM,
    SPECIAL_TOKENS,
    add_special_tokens,
    build_small_llm,
    embedded_llm_path,
    freeze,
    load_llm,
)
from allmrec.models.projection import (
    IGNORE_INDEX,
    ALLMRecLM,
    ItemProjector,
    Stage2Example,
    UserProjector,
    encode_prompt,
    encode_target,
    hit_contains,
    hit_exact,
)
from allmrec.prompts import build_prompt, shuffle_candidates, target_text

D_CF = 50
TITLES = {
    0: "Toy Story (1995)",
    1: "GoldenEye (1995)",
    2: "Four Rooms (1995)",
    3: "Get Shorty (1995)",
    4: "Copycat (1995)",
    5: "Twelve Monkeys (1995)",
    6: "Babe (1995)",
    7: "Dead Man Walking (1995)",
    8: "Usual Suspects, The (1995)",
    9: "Mr. Holland's Opus (1995)",
    10: "Braveheart (1995)",
    11: "Apollo 13 (1995)",
}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_llm():
    model, tokenizer = load_llm(EMBEDDED_LLM)  # dequantizes into the default cache if absent
    ids = add_special_tokens(model, tokenizer)
    return freeze(model), tokenizer, ids


@pytest.fixture(scope="module")
def small():
    model, tokenizer = build_small_llm()  # SmolLM2's tokenizer, from the cache
    add_special_tokens(model, tokenizer)
    torch.manual_seed(0)
    lm = ALLMRecLM(model, tokenizer, d_cf=D_CF)
    z = torch.rand(len(TITLES), 128)  # z_i table indexed by item id
    return lm, z


def _examples(z: torch.Tensor, with_targets: bool = True) -> list[Stage2Example]:
    g = torch.Generator().manual_seed(1)
    p1 = build_prompt([0, 1, 2, 3], shuffle_candidates([4, 5, 6, 7, 8], seed=1), TITLES)
    p2 = build_prompt([9], shuffle_candidates([10, 11, 0], seed=2), TITLES, domain="games")
    return [
        Stage2Example(p1, torch.randn(D_CF, generator=g), z, TITLES[6] if with_targets else None),
        Stage2Example(p2, torch.randn(D_CF, generator=g), z, TITLES[11] if with_targets else None),
    ]


# -- the real SmolLM2 ------------------------------------------------------------------------


def test_embedded_llm_special_tokens_keep_the_models_eos(real_llm):
    model, tokenizer, ids = real_llm
    assert set(ids) == set(SPECIAL_TOKENS)
    assert sorted(ids.values()) == [49152, 49153, 49154]
    assert len(tokenizer) == 49155
    assert model.get_input_embeddings().weight.shape == (49155, 576)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    # The model's own EOS, not a new token (the reference's OPT </s> trap), and a pad exists.
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id == 2
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id < 49152
    assert tokenizer.convert_tokens_to_ids("</s>") in (None, tokenizer.unk_token_id)
    # Special tokens are never split, and the tokenizer adds no BOS to a prompt.
    text = '[UserRep] is "Babe"[HistoryEmb], "Babe"[CandidateEmb]'
    pieces = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert pieces[0] == ids["[UserRep]"]
    assert pieces.count(ids["[HistoryEmb]"]) == 1 and pieces.count(ids["[CandidateEmb]"]) == 1
    # The target ends with the model's own EOS token.
    assert encode_target(tokenizer, "Babe")[-1] == tokenizer.eos_token_id
    assert target_text("Babe", tokenizer.eos_token) == '"Babe"<|im_end|>'


def test_generate_from_inputs_embeds_with_the_real_llm(real_llm):
    model, tokenizer, _ = real_llm
    torch.manual_seed(0)
    lm = ALLMRecLM(model, tokenizer, d_cf=D_CF)
    prompt = build_prompt([0, 1], [2, 3, 4], TITLES)
    user, items = torch.randn(D_CF), torch.rand(len(TITLES), 128)
    out = lm.generate([(prompt, user, items), (prompt, -user, 5 * items)], max_new_tokens=8)
    assert len(out) == 2 and all(isinstance(text, str) and text.strip() for text in out)
    # The same words with other embeddings at [UserRep] / [HistoryEmb] / [CandidateEmb]: if the
    # injection were ignored, the greedy answers would be equal.
    assert out[0] != out[1], out


def test_load_llm_second_load_reads_the_cache(real_llm, monkeypatch):
    folder = embedded_llm_path(EMBEDDED_LLM)  # exists: the fixture made it if it was absent
    weights = folder / "model.safetensors"
    assert weights.is_file() and (folder / "tokenizer.json").is_file()
    written = weights.stat().st_mtime_ns

    def dequantize_again(*args):
        raise AssertionError("the second load dequantized the GGUF again")

    monkeypatch.setattr("allmrec.llm._dequantize_gguf", dequantize_again)
    model, tokenizer = load_llm(EMBEDDED_LLM)
    assert weights.stat().st_mtime_ns == written  # read, not rewritten
    first = real_llm[0].state_dict()  # the fixture's, with 3 special-token rows appended
    for key, value in model.state_dict().items():
        assert torch.equal(value, first[key][: len(value)]), key
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == 49152


# -- the prompt --------------------------------------------------------------------------------


def test_prompt_text_movies_exactly():
    prompt = build_prompt([0, 1], [4, 2, 3], TITLES)
    expected = (
        '[UserRep] is a user representation. This user has watched "Toy Story (1995)"'
        '[HistoryEmb], "GoldenEye (1995)"[HistoryEmb] in the previous. Recommend one next '
        "movie for this user to watch next from the following movie title set, "
        '"Copycat (1995)"[CandidateEmb], "Four Rooms (1995)"[CandidateEmb], '
        '"Get Shorty (1995)"[CandidateEmb]. The recommendation is '
    )
    assert prompt.text == expected
    assert prompt.history_items == [0, 1] and prompt.candidate_items == [4, 2, 3]
    assert prompt.items == [0, 1, 4, 2, 3]


def test_prompt_domains_history_cut_and_seeded_shuffle():
    games = build_prompt([0], [1], TITLES, domain="games").text
    assert "This user has played " in games and "one next game for this user to play next" in games
    assert "following game title set" in games
    products = build_prompt([0], [1], TITLES, domain="products").text
    assert "has bought " in products and "one next item for this user to buy next" in products
    long = build_prompt(list(range(12)), [0], TITLES)
    assert long.history_items == list(range(2, 12))  # the last 10, oldest first
    assert long.text.count("[HistoryEmb]") == 10
    assert shuffle_candidates(range(20), 7) == shuffle_candidates(range(20), 7)
    assert sorted(shuffle_candidates(range(20), 7)) == list(range(20))
    assert shuffle_candidates(range(20), 7) != shuffle_candidates(range(20), 8)
    with pytest.raises(ValueError, match="domain"):
        build_prompt([0], [1], TITLES, domain="books")


# -- the tiny Llama ----------------------------------------------------------------------------


def test_injection_puts_each_vector_at_its_token_only(small):
    lm, z = small
    examples = _examples(z)
    batch = lm.collate(examples)
    with torch.no_grad():
        embeds = lm.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
        plain = lm.llm.get_input_embeddings()(batch.input_ids)
        x_u = lm.user_projector(batch.user_vectors)
    ids = lm.token_ids
    for b, example in enumerate(examples):
        items = iter(example.prompt.items)
        n_user = n_item = 0
        for t, token in enumerate(batch.input_ids[b].tolist()):
            if token == ids["[UserRep]"]:
                expected = x_u[b]
                n_user += 1
            elif token in (ids["[HistoryEmb]"], ids["[CandidateEmb]"]):
                with torch.no_grad():
                    expected = lm.item_projector(z[next(items)])
                n_item += 1
            else:
                expected = plain[b, t]
            torch.testing.assert_close(embeds[b, t], expected)
        assert n_user == 1 and n_item == len(example.prompt.items)
        assert next(items, None) is None
    # The projected rows differ from the special tokens' own embedding rows.
    assert not torch.allclose(x_u[0], lm.llm.get_input_embeddings().weight[ids["[UserRep]"]])
    # One flat [sum n_b, 128] tensor in row-major order gives the same embeddings.
    with torch.no_grad():
        flat = lm.embed_prompts(batch.input_ids, batch.user_vectors, torch.cat(batch.item_vectors))
    torch.testing.assert_close(flat, embeds)


def test_injection_rejects_a_wrong_number_of_vectors(small):
    lm, z = small
    batch = lm.collate(_examples(z))
    short = [batch.item_vectors[0][:-1], batch.item_vectors[1]]
    with pytest.raises(ValueError, match=r"\[HistoryEmb\]/\[CandidateEmb\] tokens"):
        lm.embed_prompts(batch.input_ids, batch.user_vectors, short)
    with pytest.raises(ValueError, match="user_vectors"):
        lm.embed_prompts(batch.input_ids, batch.user_vectors[:1], batch.item_vectors)


def test_labels_cover_the_whole_title_and_eos_only(small):
    lm, z = small
    examples = _examples(z)
    tokenizer = lm.tokenizer
    batch = lm.collate(examples)
    assert batch.input_ids.shape[0] == 2
    for b, example in enumerate(examples):
        prompt_ids = encode_prompt(tokenizer, example.prompt.text)
        target_ids = encode_target(tokenizer, example.target_title)
        n = len(prompt_ids) + len(target_ids)
        labels = batch.labels[b]
        assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all()
        assert labels[len(prompt_ids) : n].tolist() == target_ids
        assert (labels[n:] == IGNORE_INDEX).all()  # right padding
        assert batch.attention_mask[b, :n].all() and not batch.attention_mask[b, n:].any()
        assert batch.input_ids[b, :n].tolist() == prompt_ids + target_ids
        # The first target token is kept: the label text is the whole quoted title + EOS.
        assert tokenizer.decode(target_ids) == f'"{example.target_title}"{tokenizer.eos_token}'
        assert target_ids[0] == tokenizer('"', add_special_tokens=False)["input_ids"][0]
        assert target_ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.bos_token_id not in target_ids
    # The loss on label positions only equals the LM's own loss over full logits.
    with torch.no_grad():
        loss = lm.training_loss(batch)
        embeds = lm.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
        reference = lm.llm(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_shared_prefix_ranking_equals_full_forwards(small):
    lm, z = small
    prompt = build_prompt([0, 1, 2], shuffle_candidates(range(3, 12), seed=4), TITLES)
    titles = [TITLES[i] for i in prompt.candidate_items]
    x_u = torch.randn(D_CF, generator=torch.Generator().manual_seed(2))
    fast = lm.rank_candidates(prompt, x_u, z, titles)
    slow = lm.rank_candidates_full(prompt, x_u, z, titles)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast.mean_scores, slow.mean_scores, rtol=1e-5, atol=1e-4)
    assert fast.order == slow.order and fast.items == slow.items
    assert sorted(fast.items) == sorted(prompt.candidate_items)
    assert fast.lengths.tolist() == [len(encode_target(lm.tokenizer, t)) for t in titles]
    by_mean = lm.rank_candidates(prompt, x_u, z, titles, by="mean")
    assert by_mean.order == torch.argsort(fast.mean_scores, descending=True, stable=True).tolist()


def test_only_the_projectors_get_gradients(small):
    lm, z = small
    lm.train()
    assert not lm.llm.training  # the frozen LLM stays in eval mode
    lm.zero_grad(set_to_none=True)
    loss = lm.training_loss(lm.collate(_examples(z)))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in lm.llm.parameters())
    for projector in (lm.user_projector, lm.item_projector):
        assert all(p.requires_grad and p.grad is not None for p in projector.parameters())
        assert any(p.grad.abs().sum() > 0 for p in projector.parameters())
    trainable = {n.split(".")[0] for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {"user_projector", "item_projector"}
    lm.eval()


def test_projector_shapes():
    f_u, f_i = UserProjector(D_CF, 576), ItemProjector(128, 576)
    kinds = [type(m).__name__ for m in f_u.net] + [type(m).__name__ for m in f_i.net]
    assert kinds == ["Linear", "LayerNorm", "LeakyReLU", "Linear"] + [
        "Linear",
        "LayerNorm",
        "GELU",
        "Linear",
    ]
    assert f_u(torch.randn(3, D_CF)).shape == (3, 576) and f_i(torch.randn(5, 128)).shape == (
        5,
        576,
    )


def test_hit_rules():
    assert hit_contains('"Toy Story (1995)"', "Toy Story (1995)")
    assert hit_contains('I pick "toy story (1995)" for you', '"Toy Story (1995)"')
    assert not hit_contains('"Toy Story 2 (1999)"', "Toy Story (1995)")
    assert hit_exact('"Toy Story (1995)"', "Toy Story (1995)")
    assert hit_exact('  "toy story 1995" because it is fun', "Toy Story (1995)")
    assert hit_exact("Usual Suspects, The (1995)\nmore", "usual suspects the (1995)")
    assert not hit_exact('"Toy Story (1995) 2"', "Toy Story (1995)")
    assert not hit_exact("I pick Toy Story (1995)", "Toy Story (1995)")


def test_collate_refuses_a_batch_with_some_targets_missing(small):
    lm, z = small
    with_target, without = _examples(z)[0], _examples(z, with_targets=False)[1]
    with pytest.raises(ValueError, match="target_title"):
        lm.collate([with_target, without])
    assert lm.collate(_examples(z, with_targets=False)).labels is None


def test_an_inference_replica_takes_the_faster_dtype_of_its_cpu():
    """`llm_dtype: auto` of a Serve LLM replica: bf16 only where this CPU's bf16 matmuls are
    measured at least 1.3x faster than fp32's, and the same choice as a longer measurement of
    its own makes wherever this CPU is clearly on one side (the CPUs met: 0.3x or 3.5x)."""
    import math

    from allmrec.llm import BF16_SPEEDUP_TO_SWITCH, fastest_dtype, matmul_flops

    assert matmul_flops(torch.float32, n=256, repeats=2) > 1e8  # a CPU does 0.1 GFLOP/s
    dtype, speedup = fastest_dtype("cpu")
    assert math.isfinite(speedup) and speedup > 0
    assert dtype == ("bfloat16" if speedup >= BF16_SPEEDUP_TO_SWITCH else "float32")
    fp32 = max(matmul_flops(torch.float32, n=1024, repeats=4) for _ in range(2))
    bf16 = max(matmul_flops(torch.bfloat16, n=1024, repeats=4) for _ in range(2))
    if bf16 / fp32 > 2 * BF16_SPEEDUP_TO_SWITCH:
        assert dtype == "bfloat16", (speedup, bf16 / fp32)
    elif bf16 / fp32 < BF16_SPEEDUP_TO_SWITCH / 2:
        assert dtype == "float32", (speedup, bf16 / fp32)


def test_keep_best_gives_a_trained_point_up_to_its_min_delta():
    """`stage2.keep: best` ranks validation points by Hit@1; a point after steps must beat the
    start by `keep_min_delta`, and of equal scores the earlier point is kept."""
    from allmrec.training.stage2 import keep_score

    curve = [
        {"prompts": 0, "valid_hit@1": 0.48},
        {"prompts": 300, "valid_hit@1": 0.49},
        {"prompts": 600, "valid_hit@1": 0.49},
        {"prompts": 900, "valid_hit@1": 0.47},
    ]

    def kept(min_delta: float) -> int:
        return max(curve, key=lambda p: keep_score(p, min_delta))["prompts"]

    assert kept(0.0) == 300  # the best, the earlier of two equal
    assert kept(0.03) == 0  # one user of 100 above the start is not enough
    curve.append({"prompts": 1200, "valid_hit@1": 0.52})
    assert kept(0.03) == 1200
    generate = {"prompts": 0, "valid_likelihood_hit@1": 0.3}  # the generate objective's
    assert keep_score(generate) == 0.3


def test_keep_best_compares_cold_items_weighted_as_the_gate_fit():
    """With the text-aware readout's gate, `keep: best` compares validation Hit@1 with each
    user of a cold item weighted by the gate's cold weight, the cold-item users beyond the
    sample included at their share of all validation users: a point whose steps gained on
    warm items and lost cold ones is not kept over the start, though its Hit@1 over the
    sample is higher."""
    from types import SimpleNamespace

    import numpy as np

    from allmrec.training.stage2 import WEIGHTED_HIT, keep_score, validation_weights

    cold_items = np.zeros(11, dtype=bool)
    cold_items[[7, 9]] = True
    valid = np.array([0, 7, 9, 3, 4, 5, 6, 1, 2, 3, 4])  # users 1-10: 2 of 10 cold, p = 0.2
    data = SimpleNamespace(valid=valid, eval_users=lambda split: np.arange(1, 11))
    inputs = SimpleNamespace(cold_items=cold_items, data=data)
    # the sample's six cases, then two cold-item users beyond it
    cases = [SimpleNamespace(candidates=np.array([item, 1, 2])) for item in [7, 9, 3, 4, 5, 6]]
    cases += [SimpleNamespace(candidates=np.array([item, 1, 2])) for item in [9, 7]]
    weights = validation_weights(cases, 6, inputs, {"gate_cold_weight": 6.0})
    assert weights.sample.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert weights.cold.tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    # the others at 1 - p = 0.8 over their 4 cases, the 4 cold ones at w p = 1.2 over them
    assert weights.weighted == pytest.approx([0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3])
    assert validation_weights(cases, 6, inputs, {}).weighted is None  # no gate: Hit@1 alone

    def point(prompts, hits):
        hits = np.array(hits)
        return {
            "prompts": prompts,
            "valid_hit@1": hits[:6].mean(),
            WEIGHTED_HIT: float(hits @ weights.weighted / weights.weighted.sum()),
        }

    start = point(0, [1, 1, 1, 0, 0, 0, 1, 1])  # every cold user right
    trained = point(500, [0, 1, 1, 1, 1, 0, 0, 1])  # two cold users lost, two others won
    assert trained["valid_hit@1"] > start["valid_hit@1"] + 0.1
    assert start[WEIGHTED_HIT] == pytest.approx(0.7) and trained[WEIGHTED_HIT] == pytest.approx(0.6)
    assert max([start, trained], key=keep_score)["prompts"] == 0
    assert keep_score({"prompts": 0, "valid_hit@1": 0.4}) == 0.4  # recorded before it


def test_the_rank_loss_weighs_cold_targets_as_the_gate():
    """`stage2.cold_target_weight`: the rank loss is the rows' mean weighted by each
    example's weight, a cold target's the gate's cold weight by default."""
    from allmrec.config import load_config
    from allmrec.models.readout import listwise_loss
    from allmrec.training.stage2 import target_cold_weight

    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    rows = torch.nn.functional.cross_entropy(scores, targets, reduction="none")
    weighted = listwise_loss(scores, targets, torch.tensor([1.0, 6.0]))
    assert float(weighted) == pytest.approx(float(rows[0] + 6 * rows[1]) / 7, rel=1e-6)
    same = listwise_loss(scores, targets, torch.tensor([3.0, 3.0]))
    assert float(same) == pytest.approx(float(listwise_loss(scores, targets)), rel=1e-6)
    with pytest.raises(ValueError, match="weights"):
        listwise_loss(scores, targets, torch.ones(3))
    config = load_config([], [])
    assert target_cold_weight(config, {"gate_cold_weight": 6.0}) == 6.0
    assert target_cold_weight(config, {}) == 1.0  # no gate
    fixed = load_config([], ["stage2.cold_target_weight=1"])
    assert target_cold_weight(fixed, {"gate_cold_weight": 6.0}) == 1.0


def test_the_curve_adds_cold_item_users_beyond_its_sample():
    """`stage2.validation_cold_users`: seeded valid-split users outside the sample, each with
    a cold validation item, at most as many as set; none for the generate objective."""
    from types import SimpleNamespace

    import numpy as np

    from allmrec.config import load_config
    from allmrec.training.stage2 import validation_cold_users, validation_users

    cold_items = np.zeros(101, dtype=bool)
    cold_items[80:] = True
    valid = np.r_[0, np.arange(1, 101)]  # user u's validation item is u: users 80-100 cold
    data = SimpleNamespace(valid=valid, eval_users=lambda split: np.arange(1, 101))
    inputs = SimpleNamespace(cold_items=cold_items, data=data)
    settings = ["stage2.objective=rank", "stage2.readout=user_item_text"]
    config = load_config([], [*settings, "stage2.validation_users=30"])
    config.stage2.validation_cold_users = 5
    sampled = validation_users(inputs, config)
    beyond = validation_cold_users(inputs, config)
    assert len(beyond) == 5 and cold_items[valid[beyond]].all()
    assert not np.isin(beyond, sampled).any()
    config.stage2.validation_cold_users = 200  # as many as there are
    everyone = validation_cold_users(inputs, config)
    assert len(everyone) == 21 - cold_items[valid[sampled]].sum()
    config.stage2.objective = "generate"
    assert len(validation_cold_users(inputs, config)) == 0
