"""Stage 2 of A-LLMRec: the joint embedding projected into the frozen LLM's token space.

Symbols as in the paper (docs/method.md, section 3):
- x_u: the frozen CF user representation (d_cf); z_i: the Stage-1 joint item embedding (128);
- F_U = Linear(d_cf -> d_llm) -> LayerNorm -> LeakyReLU -> Linear(d_llm -> d_llm), on x_u;
- F_I = Linear(128 -> d_llm) -> LayerNorm -> GELU -> Linear(d_llm -> d_llm), on z_i;
- in a prompt (`allmrec.prompts`), the input embedding row of `[UserRep]` is overwritten by
  F_U(x_u) and that of each `[HistoryEmb]` / `[CandidateEmb]`, in order, by F_I(z_i).

Loss: the LM cross-entropy over the target, `"title"` of the true next item + the model's own
EOS; labels are -100 on the prompt and the padding. Unlike the reference code, the first target
token is kept (the reference drops it, assuming a BOS was prepended to the target), and the
target is tokenized without special tokens, so no BOS lands inside the sequence.

Evaluation: `generate` is the paper's protocol (greedy, a hit when the true title is in the
output, `hit_contains`); `rank_candidates` scores the 20 candidates by their likelihood after
the prompt, which gives Hit@k for any k (the reference's users asked for Hit@3/Hit@5).

The `rank` objective (`allmrec.models.readout`) keeps the same prompt and projectors but adds
a small head over the LLM's hidden states: one forward pass scores every candidate
(`candidate_scores`) and the loss is the cross-entropy over them. The `LLM bypassed` ablation
(`BypassRanker`) trains the same head on F_U(x_u) and F_I(z_i) without the LLM.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmrec.llm import SPECIAL_TOKENS, first_layers, freeze
from allmrec.models.readout import RankReadout, TextInputs, listwise_loss
from allmrec.prompts import CANDIDATE_TOKEN, HISTORY_TOKEN, USER_TOKEN, Prompt, quote_title
from allmrec.sequences import left_pad

IGNORE_INDEX = -100


class UserProjector(nn.Module):
    """F_U: Linear(d_cf -> d_llm) -> LayerNorm -> LeakyReLU -> Linear(d_llm -> d_llm)."""

    def __init__(self, d_cf: int, d_llm: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_cf, d_llm), nn.LayerNorm(d_llm), nn.LeakyReLU(), nn.Linear(d_llm, d_llm)
        )

    def forward(self, x_u: Tensor) -> Tensor:
        return self.net(x_u.to(self.net[0].weight.dtype))


class ItemProjector(nn.Module):
    """F_I: Linear(d_joint -> d_llm) -> LayerNorm -> GELU -> Linear(d_llm -> d_llm)."""

    def __init__(self, d_joint: int, d_llm: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_joint, d_llm), nn.LayerNorm(d_llm), nn.GELU(), nn.Linear(d_llm, d_llm)
        )

    def forward(self, z_i: Tensor) -> Tensor:
        return self.net(z_i.to(self.net[0].weight.dtype))


# ---------------------------------------------------------------------------------------------
# Tokenization and batches: the only place where prompts and targets become token ids.


class Stage2Example(NamedTuple):
    """One user: the prompt, x_u, z_i by item id, and the training target (None at inference):
    the true title for the `generate` objective, the true item id for `rank`."""

    prompt: Prompt
    user_vector: Tensor  # x_u, [d_cf]
    item_vectors: Mapping[int, Tensor] | Tensor  # z_i by item id: a dict or a [n_items, 128] table
    target_title: str | None = None
    target_item: int | None = None
    # the `user_item_text` readout's: q_i and the training interactions n_i by item id
    item_text: Mapping[int, Tensor] | Tensor | None = None
    item_counts: Mapping[int, int] | Tensor | None = None
    weight: float = 1.0  # in the rank objective's loss (`stage2.cold_target_weight`)


@dataclass
class Stage2Batch:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor | None  # [B, T], IGNORE_INDEX on the prompt and the padding
    user_vectors: Tensor  # x_u, [B, d_cf]
    item_vectors: list[Tensor]  # per row: z_i of its [HistoryEmb]/[CandidateEmb] tokens, in order
    candidate_vectors: Tensor  # z_i of each row's candidates in prompt order, [B, C, d_joint]
    candidate_mask: Tensor  # [B, C], False where a row has fewer candidates than C
    targets: Tensor | None = None  # [B], the true item's index among the row's candidates
    text: TextInputs | None = None  # the candidates' text, when the examples carry it
    weights: Tensor | None = None  # [B], each row's weight in the rank loss; None: all 1

    def to(self, device: torch.device | str) -> Stage2Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device)
            elif isinstance(value, TextInputs):
                value = TextInputs(*(None if v is None else v.to(device) for v in value))
            elif isinstance(value, list):
                value = [v.to(device) for v in value]
            moved[f.name] = value
        return Stage2Batch(**moved)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids, with the BOS the tokenizer adds (if any) and never a trailing EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids and ids[-1] == tokenizer.eos_token_id and not text.endswith(tokenizer.eos_token):
        ids = ids[:-1]
    return ids


def encode_target(tokenizer, title: str) -> list[int]:
    """`"title"` without special tokens (no BOS inside the sequence), then the model's EOS."""
    ids = list(tokenizer(quote_title(title), add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id]


def _item_vectors(table: Mapping[int, Tensor] | Tensor, items: Sequence[int]) -> Tensor:
    if isinstance(table, Mapping):
        if not items:
            return torch.zeros(0, 0)
        return torch.stack([torch.as_tensor(table[i], dtype=torch.float32) for i in items])
    table = torch.as_tensor(np.asarray(table) if not isinstance(table, Tensor) else table)
    return table[torch.as_tensor(list(items), dtype=torch.long)].float()


def _item_counts(table: Mapping[int, int] | Tensor, items: Sequence[int]) -> Tensor:
    if isinstance(table, Mapping):
        return torch.tensor([int(table[i]) for i in items], dtype=torch.long)
    return torch.as_tensor(table)[torch.as_tensor(list(items), dtype=torch.long)].long()


def _text_inputs(examples: Sequence[Stage2Example], width: int) -> TextInputs | None:
    """The candidates' q_i and counts (padded like the candidates; a training target's count
    without its own interaction) and each prompt's history q_j and counts, right-aligned
    (zero rows before a shorter history); None when the examples carry no text."""
    if all(e.item_text is None for e in examples):
        return None
    if any(e.item_text is None or e.item_counts is None for e in examples):
        raise ValueError("collate_stage2: every example needs item_text and item_counts, or none")
    history, history_counts, items, counts = [], [], [], []
    for e in examples:
        cands = e.prompt.candidate_items
        q = _item_vectors(e.item_text, cands)
        padded = torch.zeros(width, q.shape[1])
        padded[: len(cands)] = q
        items.append(padded)
        n = torch.zeros(width, dtype=torch.long)
        n[: len(cands)] = _item_counts(e.item_counts, cands)
        if e.target_item is not None:
            # a training target's count holds this very interaction: counted without it, the
            # target looks as it will at test time (an item seen once is then an item never
            # seen, the bucket of items added at serving time)
            at = cands.index(e.target_item)
            n[at] = (n[at] - 1).clamp_min(0)
        counts.append(n)
        hist = e.prompt.history_items
        history.append(_item_vectors(e.item_text, hist) if hist else torch.zeros(0, q.shape[1]))
        history_counts.append(_item_counts(e.item_counts, hist).numpy())
    history = right_aligned(history)
    history_counts = torch.as_tensor(left_pad(history_counts, history.shape[1]))
    return TextInputs(history, torch.stack(items), torch.stack(counts), history_counts)


def right_aligned(rows: Sequence[Tensor]) -> Tensor:
    """[B, H, d] from B tensors [n_b, d], H the longest: each one's rows last, zeros before."""
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, rows[0].shape[1] if rows else 0)
    for b, r in enumerate(rows):
        if len(r):
            out[b, width - len(r) :] = r
    return out


def collate_stage2(
    examples: Sequence[Stage2Example | tuple], tokenizer, padding_side: str = "right"
) -> Stage2Batch:
    """Padded tensors for a list of examples (or (prompt, x_u, z table, title) tuples).

    Right padding for training and ranking, left padding for batched generation. Labels are
    built when the examples have target titles (all of them or none).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side {padding_side!r}: expected 'right' or 'left'")
    examples = [Stage2Example(*e) for e in examples]
    with_targets = all(e.target_title is not None for e in examples)
    if not with_targets and any(e.target_title is not None for e in examples):
        raise ValueError("collate_stage2: either every example has a target_title or none has")
    with_items = all(e.target_item is not None for e in examples)
    if not with_items and any(e.target_item is not None for e in examples):
        raise ValueError("collate_stage2: either every example has a target_item or none has")
    rows, label_rows = [], []
    for e in examples:
        prompt_ids = encode_prompt(tokenizer, e.prompt.text)
        target_ids = encode_target(tokenizer, e.target_title) if with_targets else []
        rows.append(prompt_ids + target_ids)
        label_rows.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows, strict=True)):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[b, span] = torch.tensor(ids)
        attention_mask[b, span] = 1
        labels[b, span] = torch.tensor(lab)
    user_vectors = torch.stack(
        [torch.as_tensor(e.user_vector, dtype=torch.float32) for e in examples]
    )
    item_vectors = [_item_vectors(e.item_vectors, e.prompt.items) for e in examples]
    candidate_vectors, candidate_mask = _candidate_table(examples)
    targets = None
    if with_items:
        for e in examples:
            if e.target_item not in e.prompt.candidate_items:
                raise ValueError(f"target_item {e.target_item} is not among the candidates")
        targets = torch.tensor(
            [e.prompt.candidate_items.index(e.target_item) for e in examples], dtype=torch.long
        )
    weights = None
    if any(e.weight != 1 for e in examples):
        weights = torch.tensor([float(e.weight) for e in examples])
    return Stage2Batch(
        input_ids,
        attention_mask,
        labels if with_targets else None,
        user_vectors,
        item_vectors,
        candidate_vectors,
        candidate_mask,
        targets,
        _text_inputs(examples, candidate_mask.shape[1]),
        weights,
    )


def _candidate_table(examples: Sequence[Stage2Example]) -> tuple[Tensor, Tensor]:
    """z_i of every row's candidates, padded to the longest row, and the mask of real ones."""
    width = max(len(e.prompt.candidate_items) for e in examples)
    rows = [_item_vectors(e.item_vectors, e.prompt.candidate_items) for e in examples]
    dim = max((r.shape[1] for r in rows if r.numel()), default=0)
    table = torch.zeros(len(rows), width, dim)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r.numel():
            table[b, : len(r)] = r
            mask[b, : len(r)] = True
    return table, mask


# ---------------------------------------------------------------------------------------------
# The Stage-2 model.


@dataclass
class RankResult:
    """Candidates by likelihood after the prompt, best first."""

    order: list[int]  # indices into the candidate list, best first
    items: list[int]  # candidate item ids, best first
    scores: Tensor  # [n], sum of log-probs of each candidate's tokens ("title" + EOS)
    mean_scores: Tensor  # [n], the same per token
    lengths: Tensor  # [n], tokens per candidate


def _drop_llm_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "llm.")]:
        del state_dict[key]


class BypassRanker(nn.Module):
    """The `rank` readout without the LLM: its own F_U and F_I feed the same head directly
    (F_U(x_u) in place of the LLM's last hidden state, F_I(z_c) in place of the state at c)."""

    def __init__(
        self,
        kind: str,
        d_cf: int,
        d_joint: int,
        d_llm: int,
        dim: int = 128,
        d_text: int | None = None,
        text_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.user_projector = UserProjector(d_cf, d_llm)
        self.item_projector = ItemProjector(d_joint, d_llm)
        self.readout = RankReadout(kind, d_llm, d_cf, d_joint, dim, d_text, **(text_options or {}))

    def forward(self, batch: Stage2Batch) -> Tensor:
        """Scores [B, C] of each row's candidates, -inf on padding."""
        x_u, z = batch.user_vectors, batch.candidate_vectors
        scores = self.readout(self.user_projector(x_u), self.item_projector(z), x_u, z, batch.text)
        return scores.masked_fill(~batch.candidate_mask, float("-inf"))

    def user_query(self, batch: Stage2Batch) -> Tensor:
        """The readout's query for each row (`RankReadout.user_query`), F_U(x_u) for h."""
        x_u = batch.user_vectors
        return self.readout.user_query(self.user_projector(x_u), x_u, batch.text)


class ALLMRecLM(nn.Module):
    """The frozen LLM with the two trainable projectors F_U and F_I (and, for the `rank`
    objective, the readout head and the LLM-bypassed ablation).

    The LLM is a submodule (not a plain attribute), so a DeepSpeed ZeRO-3 engine around this
    module partitions it; it stays frozen and in eval mode whatever `train()` is called with.
    `llm` and `tokenizer` must already carry the special tokens (`allmrec.llm.add_special_tokens`).
    `readout_layer`: the `rank` objective reads the hidden states after that many decoder
    blocks and does not run the rest (None: all of them).
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer,
        d_cf: int,
        d_joint: int = 128,
        objective: str = "generate",
        readout: str = "user_item",
        readout_layer: int | None = None,
        readout_dim: int = 128,
        bypass: bool = True,
        d_text: int | None = None,
        text_options: dict | None = None,
    ) -> None:
        """`text_options`: the `user_item_text` readout's text path (`RankReadout`'s
        text_path, content_dim, content_window)."""
        super().__init__()
        if objective not in ("generate", "rank"):
            raise ValueError(f"stage2.objective {objective!r}: expected 'generate' or 'rank'")
        self.llm = freeze(llm)
        self.tokenizer = tokenizer
        self.token_ids = {}
        for token in SPECIAL_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(
                    f"tokenizer has no {token}: call allmrec.llm.add_special_tokens(llm, tokenizer)"
                )
            self.token_ids[token] = int(tid)
        rows = llm.get_input_embeddings().num_embeddings
        if max(self.token_ids.values()) >= rows and rows > 0:
            raise ValueError(
                f"LLM input embeddings have {rows} rows but {self.token_ids} need more: "
                "resize them (allmrec.llm.add_special_tokens does)"
            )
        d_llm = llm.get_input_embeddings().embedding_dim
        self.objective = objective
        self.readout_layer = readout_layer
        self.user_projector = UserProjector(d_cf, d_llm)  # F_U
        self.item_projector = ItemProjector(d_joint, d_llm)  # F_I
        self.readout = self.bypass = None
        if objective == "rank":
            options = text_options or {}
            self.readout = RankReadout(
                readout, d_llm, d_cf, d_joint, readout_dim, d_text, **options
            )
            if bypass:
                self.bypass = BypassRanker(
                    readout, d_cf, d_joint, d_llm, readout_dim, d_text, options
                )
        # The state of this module is the projectors: the LLM is a frozen input, loaded by
        # name. So no checkpoint ever holds it (DeepSpeed's exclude_frozen_parameters alone
        # keeps a tied lm_head weight, a second name of the frozen embedding).
        self.register_state_dict_post_hook(_drop_llm_state)

    def train(self, mode: bool = True) -> ALLMRecLM:
        super().train(mode)
        self.llm.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.user_projector.net[0].weight.device

    def collate(
        self, examples: Sequence[Stage2Example | tuple], padding_side: str = "right"
    ) -> Stage2Batch:
        return collate_stage2(examples, self.tokenizer, padding_side)

    def embed_prompts(
        self, input_ids: Tensor, user_vectors: Tensor, item_vectors: Sequence[Tensor] | Tensor
    ) -> Tensor:
        """inputs_embeds [B, T, d_llm]: the LLM's embeddings with [UserRep] rows set to
        F_U(x_u) and [HistoryEmb]/[CandidateEmb] rows, in order, to F_I(z_i).

        `item_vectors` is a list with one [n_b, 128] tensor per row, or one [sum n_b, 128]
        tensor in row-major token order.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        user_mask = input_ids == self.token_ids[USER_TOKEN]
        item_mask = (input_ids == self.token_ids[HISTORY_TOKEN]) | (
            input_ids == self.token_ids[CANDIDATE_TOKEN]
        )
        if user_vectors.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"user_vectors: {user_vectors.shape[0]} rows for a batch of {input_ids.shape[0]}"
            )
        if isinstance(item_vectors, Tensor):
            z = item_vectors
        else:
            per_row = item_mask.sum(dim=1).tolist()
            given = [int(v.shape[0]) for v in item_vectors]
            if given != per_row:
                raise ValueError(
                    f"item_vectors: {given} vectors per row, but the prompts hold {per_row} "
                    f"{HISTORY_TOKEN}/{CANDIDATE_TOKEN} tokens"
                )
            nonempty = [v for v in item_vectors if v.numel()]
            z = torch.cat(nonempty) if nonempty else None
        n_tokens = int(item_mask.sum())
        n_vectors = 0 if z is None else int(z.shape[0])
        if n_vectors != n_tokens:
            raise ValueError(
                f"item_vectors: {n_vectors} vectors for {n_tokens} "
                f"{HISTORY_TOKEN}/{CANDIDATE_TOKEN} tokens"
            )
        b_u, t_u = user_mask.nonzero(as_tuple=True)
        if len(b_u):
            x_u = self.user_projector(user_vectors)
            embeds = embeds.index_put((b_u, t_u), x_u[b_u].to(embeds.dtype))
        if n_tokens:
            b_i, t_i = item_mask.nonzero(as_tuple=True)  # row-major: the order vectors come in
            embeds = embeds.index_put((b_i, t_i), self.item_projector(z).to(embeds.dtype))
        return embeds

    def forward(self, batch: Stage2Batch) -> dict[str, Tensor]:
        """The training losses of the objective: {"loss": what to minimise, and its parts}.

        `generate`: {"loss": LM loss}. `rank`: {"loss", "rank", "bypass"}: the listwise loss of
        the readout plus that of the bypass (their parameters are disjoint, so the sum trains
        each on its own loss).
        """
        if self.objective == "generate":
            return {"loss": self.training_loss(batch)}
        if batch.targets is None:
            raise ValueError("the rank objective needs targets: collate examples with target_item")
        losses = {"rank": listwise_loss(self.candidate_scores(batch), batch.targets, batch.weights)}
        if self.bypass is not None:
            losses["bypass"] = listwise_loss(self.bypass(batch), batch.targets, batch.weights)
        losses["loss"] = sum(losses.values())
        return losses

    # -- the rank objective -------------------------------------------------------------------

    def _readout_states(self, batch: Stage2Batch) -> tuple[Tensor, Tensor]:
        """(h_user [B, d] at each row's last real position, h_cand [B, C, d] at its
        [CandidateEmb] tokens in order) from one forward pass up to `readout_layer`."""
        embeds = self.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
        with first_layers(self.llm, self.readout_layer):
            hidden = self.llm.base_model(
                inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        width = batch.attention_mask.shape[1]
        last = width - 1 - batch.attention_mask.flip(1).argmax(dim=1)  # left or right padding
        h_user = hidden[rows, last]
        is_candidate = batch.input_ids == self.token_ids[CANDIDATE_TOKEN]
        slot = is_candidate.long().cumsum(dim=1) - 1  # the candidate's index in its row
        b, t = is_candidate.nonzero(as_tuple=True)
        if not torch.equal(is_candidate.sum(dim=1), batch.candidate_mask.sum(dim=1)):
            raise ValueError(
                f"{CANDIDATE_TOKEN} tokens per row {is_candidate.sum(dim=1).tolist()} do not "
                f"match the candidates per row {batch.candidate_mask.sum(dim=1).tolist()}"
            )
        h_cand = hidden.new_zeros(*batch.candidate_mask.shape, hidden.shape[-1])
        h_cand = h_cand.index_put((b, slot[b, t]), hidden[b, t])
        return h_user, h_cand

    def rank_forward(
        self, batch: Stage2Batch, run_llm: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """`rank`, one forward pass: (scores [B, C] of each row's candidates in prompt order,
        -inf on padding; the `user_item` readouts' query (u [B, d_cf], and t after it for
        `user_item_text`), which scores any item by `readout.item_scores`, or None for the
        `candidate` readout). `run_llm=False` scores without the LLM pass, the same scores,
        where `readout.ignores_states` (Stage 2's start); refused elsewhere."""
        if self.readout is None:
            raise ValueError("this model was not trained with stage2.objective=rank")
        if run_llm:
            h_user, h_cand = self._readout_states(batch)
        elif not self.readout.ignores_states:
            raise ValueError(
                "rank_forward(run_llm=False): this readout's scores read the LLM's hidden "
                "states (its corrections are not zero, it is the candidate readout, or ZeRO-3 "
                "holds its heads partitioned)"
            )
        else:
            # A(h) = T(h) = 0 for every h: zeros of the LLM's width and dtype stand in for them
            embeddings = self.llm.get_input_embeddings()
            h_user = batch.user_vectors.new_zeros(
                len(batch.user_vectors), embeddings.embedding_dim, dtype=embeddings.weight.dtype
            )
            h_cand = None
        x_u = batch.user_vectors.to(h_user.dtype)
        scores = self.readout(h_user, h_cand, x_u, batch.candidate_vectors, batch.text)
        scores = scores.float().masked_fill(~batch.candidate_mask, float("-inf"))
        query = None
        if self.readout.scores_any_item:
            query = self.readout.user_query(h_user, x_u, batch.text)
        return scores, query

    def candidate_scores(self, batch: Stage2Batch) -> Tensor:
        """`rank`: scores [B, C] of each row's candidates (prompt order), -inf on padding."""
        return self.rank_forward(batch)[0]

    def training_loss(self, batch: Stage2Batch) -> Tensor:
        """Mean LM cross-entropy over the target tokens (title + EOS) of the batch.

        Logits are computed only at the positions that predict a label: the LM head applied to
        a [n_labels, d] slice of the hidden states, not to [B, T, d] (docs/method.md, 6).
        """
        if batch.labels is None:
            raise ValueError("training_loss needs labels: collate examples with target titles")
        embeds = self.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
        hidden = self.llm.base_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        labels = batch.labels[:, 1:]  # position t predicts token t + 1
        keep = labels != IGNORE_INDEX
        if not bool(keep.any()):
            raise ValueError("training_loss: no label in the batch")
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[keep])

    # -- ranking ------------------------------------------------------------------------------

    def _candidate_tensors(self, titles: Sequence[str]) -> tuple[Tensor, Tensor]:
        rows = [encode_target(self.tokenizer, t) for t in titles]
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def rank_candidates(
        self,
        prompt: Prompt,
        user_vector: Tensor,
        item_vectors: Mapping[int, Tensor] | Tensor,
        candidate_titles: Sequence[str],
        by: str = "sum",
    ) -> RankResult:
        """Rank one user's candidates by the log-likelihood of `"title"` + EOS after the prompt.

        The prompt (up to "The recommendation is ") runs once with a KV cache; the cache is
        repeated along the batch and every candidate is scored in one batched forward.
        `candidate_titles` are in the order of `prompt.candidate_items`; `by` is "sum" (the
        total log-prob) or "mean" (per token).
        """
        self._check_candidates(prompt, candidate_titles)
        batch = self.collate([Stage2Example(prompt, user_vector, item_vectors)]).to(self.device)
        embeds = self.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[0, -1].float().log_softmax(dim=-1)  # predicts each first token
        cache = out.cache
        ids, mask = self._candidate_tensors(candidate_titles)
        n = ids.shape[0]
        cache.batch_repeat_interleave(n)
        attention = torch.cat([batch.attention_mask.expand(n, -1), mask], dim=1)
        logits = self.llm(
            input_ids=ids, attention_mask=attention, cache=cache, use_cache=True
        ).logits
        rest = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        token_logp = torch.cat([first[ids[:, 0]][:, None], rest], dim=1) * mask
        return self._rank(prompt, token_logp.sum(dim=1), mask.sum(dim=1), by)

    @torch.no_grad()
    def rank_candidates_full(
        self,
        prompt: Prompt,
        user_vector: Tensor,
        item_vectors: Mapping[int, Tensor] | Tensor,
        candidate_titles: Sequence[str],
        by: str = "sum",
    ) -> RankResult:
        """The slow reference of `rank_candidates`: one full forward of prompt + candidate each."""
        self._check_candidates(prompt, candidate_titles)
        scores, lengths = [], []
        for title in candidate_titles:
            batch = self.collate([Stage2Example(prompt, user_vector, item_vectors, title)])
            batch = batch.to(self.device)
            embeds = self.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
            logits = self.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
            labels = batch.labels[:, 1:]
            keep = labels != IGNORE_INDEX
            logp = logits[:, :-1][keep].float().log_softmax(dim=-1)
            scores.append(logp.gather(-1, labels[keep][:, None]).sum())
            lengths.append(int(keep.sum()))
        return self._rank(prompt, torch.stack(scores), torch.tensor(lengths), by)

    @staticmethod
    def _check_candidates(prompt: Prompt, titles: Sequence[str]) -> None:
        if len(titles) != len(prompt.candidate_items):
            raise ValueError(
                f"candidate_titles: {len(titles)} titles for {len(prompt.candidate_items)} "
                "candidates in the prompt"
            )

    @staticmethod
    def _rank(prompt: Prompt, scores: Tensor, lengths: Tensor, by: str) -> RankResult:
        if by not in ("sum", "mean"):
            raise ValueError(f"rank by {by!r}: expected 'sum' or 'mean'")
        scores, lengths = scores.cpu(), lengths.cpu()
        mean = scores / lengths
        key = scores if by == "sum" else mean
        order = torch.argsort(key, descending=True, stable=True).tolist()
        items = [prompt.candidate_items[i] for i in order]
        return RankResult(order, items, scores, mean, lengths)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[Stage2Example | tuple],
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> list[str]:
        """Greedy generation from inputs_embeds (left-padded), decoded without special tokens.

        `max_new_tokens`, not `max_length`: with inputs_embeds alone the input length is 0 to
        `generate`, which is what broke the reference's users.
        """
        batch = self.collate(examples, padding_side="left").to(self.device)
        embeds = self.embed_prompts(batch.input_ids, batch.user_vectors, batch.item_vectors)
        kwargs = {
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "suppress_tokens": list(self.token_ids.values()),
        }
        kwargs.update(generate_kwargs)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Hit rules for the evaluator.


def hit_contains(generated: str, true_title: str) -> bool:
    """The reference's rule: the true title, lowercased, is contained in the lowercased output.

    Surrounding quotes of `true_title` are ignored, so `Toy Story` and `"Toy Story"` agree.
    """
    return true_title.strip().strip('"').lower() in generated.lower()


def normalize_title(text: str) -> str:
    """Lowercase, punctuation and quotes removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def extract_title(generated: str) -> str:
    """The first quoted title of an output (`"Toy Story" is...` -> `Toy Story`), else its
    first line."""
    text = generated.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end] if end > 0 else text[1:]
    return text.split("\n", 1)[0]


def hit_exact(generated: str, true_title: str) -> bool:
    """The first title in the output equals the true title after `normalize_title`."""
    return normalize_title(extract_title(generated)) == normalize_title(true_title)
