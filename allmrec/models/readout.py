"""The `rank` objective of Stage 2: a small head that scores candidates from one forward pass.

The paper's objective (`generate`) trains F_U and F_I through the LM loss on the true title;
with a 135M LLM and the few thousand prompts a CPU affords, that does not learn (docs/results.md,
history). Here the same prompt (F_U(x_u) at [UserRep], F_I(z_i) at every [HistoryEmb] and
[CandidateEmb]) runs once through the frozen LLM, a head reads its hidden states, and the loss
is the cross-entropy over the prompt's candidates (listwise, as LlamaRec; the hidden-state
readout of LLM-SRec, KDD 2025). Only F_U, F_I and the head train.

Two heads, `stage2.readout`:

- `candidate`: s_c = tau * cos(A h_last, B h_c), with h_last the hidden state at the prompt's
  last position and h_c the one at candidate c's [CandidateEmb] token (it has read c's title
  and F_I(z_c), and the whole history before it). A, B: LayerNorm -> Linear(d_llm -> 128);
  tau = exp(a learned log-scale): raw dot products were unstable in a public A-LLMRec fork
  until cosine was used. It can only score items listed in the prompt.
- `user_item`: a user vector in the CF backbone's own space, read at the last position,
  against every item's joint embedding mapped back to that space:
      u = x_u + A(h_last),  g(z_i) = W z_i + b,  s_i = <u, g(z_i)>.
  A: LayerNorm -> Linear(d_llm -> d_cf), zero at the start; g: Linear(d_joint -> d_cf), set at
  the start by ridge least squares to the CF item embeddings (`fit_item_map`: z_i = enc_I(e_i)
  is nearly invertible, so <x_u, g(z_i)> ranks as the CF model does). Training starts at the
  CF model's ranking and the LLM learns the correction; any item with a z_i can be scored,
  whether listed in the prompt or not (the whole catalogue, items added at serving time).

- `user_item_text`: `user_item` with a text path beside the item path, weighted by how many
  training interactions each item has (the CF model knows a rarely seen item badly, its text
  says the same about every item):
      s_i = a_k <u, g(z_i)> + tau b_k cos(t, q_i) + c_k,   k = bucket of n_i (log2),
      t = unit(mean of the prompt's history q_j (unit) + T(h_last)),
  q_i the item's Sentence-BERT encoding (Stage 1's), n_i its training interactions; a, b, c
  one weight each per bucket (a 1, b and c 0 at the start: `user_item`'s ranking), each
  also scaled by one weight per bucket m of the prompt's history length (log2, 1 at the
  start: a user of two items is not one of ten, for the CF path nor for the text), T:
  LayerNorm -> Linear(d_llm -> d_text), zero at the start. `fit_gate` sets a, b, c before
  any step from examples the LLM is not needed for (its corrections are zero then): where
  the item path is weak (few interactions) the fit trusts the text more. Any item with a z_i
  and a q_i can be scored, an item added at serving time too (n = 0).

  `stage2.text_path` picks the text path: `cosine` is the one above; `content` (the default)
  replaces cos(t, q_i) by a learned content model's score (`allmrec.models.content`):
      t = c_u + T(h_last),  text_i = <t, f(q_i)> / sigma,
  c_u read from the f of the prompt's history items, f an MLP of q_i, both trained at Stage
  2's start on the training users' sequences and frozen after; sigma (`content_scale`) puts
  its scores on the cosine's scale, so that the gate's start and ridge mean the same.

The bypass (`allmrec.models.projection.BypassRanker`, the ablation row "A-LLMRec (rank, LLM
bypassed)") is the same head with its own F_U and F_I, reading F_U(x_u) in place of h_last
and F_I(z_c) in place of h_c: what the readout can do without the LLM, on the same examples.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmrec.models.content import COUNT_BUCKETS, ContentTower, count_bucket, present_rows

READOUTS = ("candidate", "user_item", "user_item_text")
TEXT_PATHS = ("cosine", "content")
# Buckets of a prompt's history length: 0, 1, 2-3, 4-7, 8-15, the last one >= 16.
HISTORY_BUCKETS = 6
TEXT_SCALE = 10.0  # tau: cosines lie in [-1, 1], the CF scores spread over several units


def history_lengths(history: Tensor) -> Tensor:
    """The number of history items of each row of `TextInputs.history` [B, H, d] (its
    present, non-zero rows), [B]."""
    return present_rows(history).sum(1)


class TextInputs(NamedTuple):
    """What the `user_item_text` readout reads of the items' text."""

    # q_j of each prompt's history items, [B, H, d_text], right-aligned (the most recent
    # last), zero rows where a prompt has fewer than H
    history: Tensor
    items: Tensor  # q_i of the items scored: [B, C, d_text] (candidates) or [N, d_text]
    counts: Tensor  # their training interactions: [B, C] or [N]
    # the history items' training interactions, [B, H] aligned with `history` (the content
    # path reads them with `stage2.content_counts`; None where no path does)
    history_counts: Tensor | None = None


def mean_unit(history: Tensor) -> Tensor:
    """The mean of the unit q_j of each row's history [B, H, d] (zero rows absent; zeros for
    an empty history): the cosine path's text query before the LLM's correction."""
    unit = F.normalize(history, dim=-1)  # zero rows stay zero
    present = history_lengths(history)[:, None]
    return unit.sum(1) / present.clamp_min(1).to(unit.dtype)


def text_cosine(history: Tensor, items: Tensor) -> Tensor:
    """The cosine path's scores at the start: cos(mean unit history q, q_c), history
    [B, H, d] and items [B, C, d] -> [B, C]."""
    t = F.normalize(mean_unit(history), dim=-1)
    return torch.einsum("bd,bcd->bc", t, F.normalize(items.to(t.dtype), dim=-1))


def listwise_loss(scores: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy over each row's candidates; -inf scores (padding) take no mass.

    `scores` [B, C], `targets` [B]: the index of the true item among the row's candidates;
    `weights` [B] (None: all 1): the weighted mean of the rows' losses.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"listwise_loss: scores {tuple(scores.shape)}, targets {tuple(targets.shape)}: "
            "expected [B, C] and [B]"
        )
    if weights is None:
        return F.cross_entropy(scores.float(), targets)
    if weights.shape != targets.shape:
        raise ValueError(f"listwise_loss: weights {tuple(weights.shape)} for {len(targets)} rows")
    rows = F.cross_entropy(scores.float(), targets, reduction="none")
    weights = weights.to(rows)
    return (rows * weights).sum() / weights.sum()


def _head(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))


class CountGate(nn.Module):
    """a_k g_m * cf + tau * b_k h_m * text + c_k r_m: one weight of a, b, c per bucket k of an
    item's training interactions, one of g, h, r per bucket m of the prompt's history length
    (a, g, h, r 1 and b, c 0 at the start: the CF path alone). The history's weights let the
    fit trust each path differently for a user of two items (a cold user: measured on ML-1M,
    the text path fitted on long histories cost them 0.03 Hit@1, docs/results.md). A module
    of its own, called through `forward`: under ZeRO-3 a module's parameters are gathered for
    its forward pass only, and the readout calls it from methods other than its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.cf_weight = nn.Parameter(torch.ones(COUNT_BUCKETS))  # a
        self.text_weight = nn.Parameter(torch.zeros(COUNT_BUCKETS))  # b
        self.bucket_bias = nn.Parameter(torch.zeros(COUNT_BUCKETS))  # c
        self.cf_by_history = nn.Parameter(torch.ones(HISTORY_BUCKETS))  # g
        self.text_by_history = nn.Parameter(torch.ones(HISTORY_BUCKETS))  # h
        self.bias_by_history = nn.Parameter(torch.ones(HISTORY_BUCKETS))  # r

    def forward(
        self, cf_scores: Tensor, text_scores: Tensor, counts: Tensor, history_len: Tensor
    ) -> Tensor:
        """Scores [B, C] from cf and text scores [B, C], counts [B, C] or [C] (the same items
        for every row) and each row's history length [B]."""
        k = count_bucket(counts)
        m = count_bucket(history_len.to(cf_scores.device), HISTORY_BUCKETS)[:, None]
        return (
            self.cf_weight[k] * self.cf_by_history[m] * cf_scores
            + TEXT_SCALE * self.text_weight[k] * self.text_by_history[m] * text_scores
            + self.bucket_bias[k] * self.bias_by_history[m]
        )

    @torch.no_grad()
    def share_history_weights(self, history_len: Tensor) -> None:
        """Each history bucket that none of `history_len` falls in takes g, h, r of the
        nearest bucket that one does (the longer of two as near)."""
        seen = (
            torch.bincount(
                count_bucket(history_len.cpu(), HISTORY_BUCKETS), minlength=HISTORY_BUCKETS
            )
            .nonzero()
            .flatten()
        )
        if len(seen) == 0:
            return
        for m in range(HISTORY_BUCKETS):
            source = int(seen[torch.argmin((seen - m).abs() * 2 - (seen > m).long())])
            for weights in (self.cf_by_history, self.text_by_history, self.bias_by_history):
                weights[m] = weights[source]

    @staticmethod
    def completed(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """`state` with the history-length weights at their start (1) where it lacks them:
        a gate saved before they existed scores as it did."""
        names = ("cf_by_history", "text_by_history", "bias_by_history")
        if f"{prefix}cf_weight" not in state:
            return state
        missing = {f"{prefix}{n}": torch.ones(HISTORY_BUCKETS) for n in names}
        return {k: v for k, v in missing.items() if k not in state} | state


class RankReadout(nn.Module):
    """s_c for every candidate c of a prompt (`kind` as in the module docstring)."""

    def __init__(
        self,
        kind: str,
        d_llm: int,
        d_cf: int,
        d_joint: int,
        dim: int = 128,
        d_text: int | None = None,
        text_path: str = "cosine",
        content_dim: int = 64,
        content_window: int = 10,
        content_counts: bool = False,
    ) -> None:
        super().__init__()
        if kind not in READOUTS:
            raise ValueError(f"stage2.readout {kind!r}: expected one of {', '.join(READOUTS)}")
        if text_path not in TEXT_PATHS:
            raise ValueError(
                f"stage2.text_path {text_path!r}: expected one of {', '.join(TEXT_PATHS)}"
            )
        self.kind = kind
        self.text_path = text_path if kind == "user_item_text" else None
        if kind == "candidate":
            self.user_head = _head(d_llm, dim)  # A
            self.item_head = _head(d_llm, dim)  # B
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # tau
        else:
            self.user_head = _head(d_llm, d_cf)  # A, zero: u = x_u at the start
            nn.init.zeros_(self.user_head[1].weight)
            nn.init.zeros_(self.user_head[1].bias)
            self.item_map = nn.Linear(d_joint, d_cf)  # g
        if kind == "user_item_text":
            if not d_text:
                raise ValueError("the user_item_text readout needs the width of q_i (d_text)")
            d_query = d_text
            if text_path == "content":
                self.content = ContentTower(
                    d_text, content_dim, content_window, counts=content_counts
                )
                self.content.requires_grad_(False)  # trained at the start only
                # sigma: the content scores' scale against the cosine's (`set_content_scale`)
                self.register_buffer("content_scale", torch.ones(()))
                d_query = content_dim
            self.text_head = _head(d_llm, d_query)  # T, zero: t = the history's query
            nn.init.zeros_(self.text_head[1].weight)
            nn.init.zeros_(self.text_head[1].bias)
            self.gate = CountGate()  # a, b, c

    @property
    def scores_any_item(self) -> bool:
        """True when items not listed in the prompt can be scored (`item_scores`)."""
        return self.kind != "candidate"

    @property
    def ignores_states(self) -> bool:
        """True when no score can depend on the LLM's hidden states: a `user_item` readout
        whose corrections A(h) (and T(h)) are exactly zero, as at Stage 2's start (a zero
        Linear after the LayerNorm gives 0 for every h), so its scores need no LLM pass.
        False where ZeRO-3 partitions the heads (their values are not all here)."""
        if self.kind == "candidate":
            return False
        heads = [self.user_head[1]] + ([self.text_head[1]] if self.reads_text else [])
        params = [p for head in heads for p in head.parameters()]
        if any(hasattr(p, "ds_id") or p.numel() == 0 for p in params):
            return False
        return not any(bool(p.detach().any()) for p in params)

    @property
    def reads_text(self) -> bool:
        """True when the readout needs `TextInputs`."""
        return self.kind == "user_item_text"

    def user_query(self, h_user: Tensor, x_u: Tensor, text: TextInputs | None = None) -> Tensor:
        """The user's query, [B, d_cf] (`user_item`: u = x_u + A(h_user)), with the text
        query t [B, d_text] after it for `user_item_text`."""
        h_user = h_user.to(self.dtype)
        u = x_u.to(self.dtype) + self.user_head(h_user)
        if not self.reads_text:
            return u
        if text is None:
            raise ValueError("the user_item_text readout needs the items' text (TextInputs)")
        t = self.history_query(text.history.to(self.dtype), text.history_counts)
        t = t + self.text_head(h_user)
        if self.text_path == "cosine":
            t = F.normalize(t, dim=-1)
        return torch.cat([u, t], dim=-1)

    def history_query(self, history: Tensor, history_counts: Tensor | None = None) -> Tensor:
        """The text query before the LLM's correction T(h), from the history's q [B, H, d]
        (and counts [B, H]): `cosine`, the mean of the history's unit q_j (zeros for no
        history); `content`, c_u."""
        if self.text_path == "content":
            return self.content.users(history, history_counts)
        return mean_unit(history)

    def text_keys(self, q: Tensor, counts: Tensor | None = None) -> Tensor:
        """What the text query meets for items of q [..., d_text] (and counts [...]):
        `cosine`, the unit q_i; `content`, f(i) / sigma."""
        if self.text_path == "content":
            return self.content.items(q, counts) / self.content_scale
        return F.normalize(q, dim=-1)

    @torch.no_grad()
    def set_content_scale(self, text_scores: Tensor, reference: Tensor) -> float:
        """`content`: sigma := the std of `text_scores` (the content path's, at sigma = 1)
        over the std of `reference` (the cosine's on the same examples). Returns sigma."""
        spread = float(reference.float().std())
        # no spread to match (every history empty: stage2.max_history 0): sigma stays 1
        sigma = float(text_scores.float().std()) / spread if spread > 1e-8 else 1.0
        self.content_scale.fill_(sigma)
        return sigma

    @property
    def dtype(self) -> torch.dtype:
        """The head's own dtype: the LLM's hidden states are cast to it, so a bf16 LLM with
        fp32 projectors and head (evaluation, serving) scores in fp32."""
        return self.user_head[1].weight.dtype

    def item_keys(self, z: Tensor) -> Tensor:
        """`user_item`: g(z_i) for any items, [..., d_cf]."""
        return self.item_map(z.to(self.item_map.weight.dtype))

    def gated(
        self, cf_scores: Tensor, text_scores: Tensor, counts: Tensor, history_len: Tensor
    ) -> Tensor:
        """`user_item_text`: the two paths' scores weighted by `CountGate`."""
        return self.gate(cf_scores, text_scores, counts, history_len)

    def path_scores(
        self, query: Tensor, z: Tensor, text: TextInputs | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(<u, g(z_i)>, cos(t, q_i) or None) of any items for the query of `user_query`:
        z [B, C, d_joint] gives [B, C] (each row's own items), z [N, d_joint] gives [B, N]
        (the same items for every row); `text` holds their q_i in the same shape."""
        text_items = (text.items, text.counts) if self.reads_text else (None, None)
        keys, text_keys = self.catalogue_keys(z, *text_items)
        if z.dim() == 2:
            return self.key_scores(query, keys, text_keys)
        d_cf = self.item_map.out_features
        cf = torch.einsum("bd,bcd->bc", query[..., :d_cf], keys)
        if text_keys is None:
            return cf, None
        return cf, torch.einsum("bd,bcd->bc", query[..., d_cf:], text_keys)

    def catalogue_keys(
        self, z: Tensor, q: Tensor | None = None, counts: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """What a query meets of items z [..., d_joint] (and their q and counts, for
        `user_item_text`): (g(z_i), `text_keys`(q_i) or None). The same for every user: Serve
        keeps a catalogue's until an item is added."""
        keys = self.item_keys(z)
        return keys, (None if q is None else self.text_keys(q.to(keys.dtype), counts))

    def key_scores(
        self, query: Tensor, keys: Tensor, text_keys: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`path_scores` of the same N items for every row, from their `catalogue_keys`
        [N, ...]: ([B, N], [B, N] or None)."""
        d_cf = keys.shape[-1]
        cf = query[..., :d_cf] @ keys.T
        return cf, (None if text_keys is None else query[..., d_cf:] @ text_keys.T)

    def start_query(self, x_u: Tensor, text: TextInputs | None = None) -> Tensor:
        """`user_query` while the LLM's corrections A(h) and T(h) are zero (the start):
        x_u, and for `user_item_text` the history's text query (`history_query`)."""
        if not self.reads_text:
            return x_u
        t = self.history_query(text.history.to(x_u.dtype), text.history_counts)
        if self.text_path == "cosine":
            t = F.normalize(t, dim=-1)
        return torch.cat([x_u, t], dim=-1)

    def item_scores(self, query: Tensor, z: Tensor, text: TextInputs | None = None) -> Tensor:
        """Scores of any items by the query of `user_query` (shapes as `path_scores`)."""
        lengths = history_lengths(text.history) if self.reads_text else None
        if z.dim() == 2:
            counts = text.counts if self.reads_text else None
            keys = self.catalogue_keys(z, text.items if self.reads_text else None, counts)
            return self.catalogue_scores(query, *keys, counts, lengths)
        cf, text_scores = self.path_scores(query, z, text)
        if text_scores is None:
            return cf
        return self.gated(cf, text_scores, text.counts.to(cf.device), lengths)

    def catalogue_scores(
        self,
        query: Tensor,
        keys: Tensor,
        text_keys: Tensor | None = None,
        counts: Tensor | None = None,
        history_len: Tensor | None = None,
    ) -> Tensor:
        """`item_scores` [B, N] of the same N items for every row, from their
        `catalogue_keys`, for `user_item_text` also their counts [N] and each row's history
        length [B]."""
        cf, text_scores = self.key_scores(query, keys, text_keys)
        if text_scores is None:
            return cf
        return self.gated(cf, text_scores, counts[None, :].to(cf.device), history_len)

    def forward(
        self,
        h_user: Tensor,
        h_cand: Tensor | None,
        x_u: Tensor,
        z_cand: Tensor,
        text: TextInputs | None = None,
    ) -> Tensor:
        """Scores [B, C] from h_user [B, d], h_cand [B, C, d] (the states at the candidates'
        tokens; read by the `candidate` readout only), x_u [B, d_cf], z_cand [B, C, d_joint]
        and, for `user_item_text`, the candidates' text."""
        if self.kind == "candidate":
            u = F.normalize(self.user_head(h_user.to(self.dtype)), dim=-1)
            v = F.normalize(self.item_head(h_cand.to(self.dtype)), dim=-1)
            return self.log_scale.exp() * torch.einsum("bd,bcd->bc", u, v)
        return self.item_scores(self.user_query(h_user, x_u, text), z_cand, text)

    @torch.no_grad()
    def fit_gate(
        self,
        cf_scores: Tensor,
        text_scores: Tensor,
        counts: Tensor,
        history_len: Tensor,
        weights: Tensor | None = None,
        steps: int = 300,
        lr: float = 0.05,
        ridge: float = 1e-3,
    ) -> dict[str, float]:
        """`user_item_text`: the gate's weights fitted by the listwise loss over examples
        whose true item is column 0: their CF scores <x_u, g(z_c)>, text scores and counts,
        [E, C] each (the readout's own scores while its LLM corrections are zero), their
        history lengths [E], each example weighted by `weights` [E] (None: alike). A small
        ridge holds each weight near its start where a bucket has few items; a history bucket
        without examples takes the weights of the nearest one with examples (fitted on long
        histories only, the gate scores a short one as it would a long one, as before it had
        the history's weights). Returns the loss before and after. A no-op for the other
        readouts."""
        if not self.reads_text:
            return {}
        cf_scores, text_scores = cf_scores.detach(), text_scores.detach()
        params = list(self.gate.parameters())
        start = [p.detach().clone() for p in params]
        targets = torch.zeros(len(cf_scores), dtype=torch.long)
        weights = torch.ones(len(cf_scores)) if weights is None else weights.float()
        weights = weights / weights.mean()

        def loss() -> Tensor:
            scores = self.gated(cf_scores, text_scores, counts, history_len)
            fit = (F.cross_entropy(scores, targets, reduction="none") * weights).mean()
            return fit + ridge * sum(
                ((p - s) ** 2).sum() for p, s in zip(params, start, strict=True)
            )

        before = float(loss())
        optimizer = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                value = loss()
                value.backward()
                optimizer.step()
        self.gate.share_history_weights(history_len)
        return {"gate_loss_before": before, "gate_loss_after": float(loss())}

    @torch.no_grad()
    def fit_item_map(self, z: Tensor, item_embeddings: Tensor, ridge: float = 1e-2) -> float:
        """`user_item`: g := the ridge least-squares map from z_i to the CF item embedding e_i
        over the catalogue (rows 0, padding, left out). Returns the relative error
        ||g(z) - e|| / ||e||. A no-op for `candidate`."""
        if not self.scores_any_item:
            return float("nan")
        z, e = z[1:].double(), item_embeddings[1:].double()
        x = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        solution = torch.linalg.solve(gram, x.T @ e)  # [d_joint + 1, d_cf]
        self.item_map.weight.copy_(solution[:-1].T.to(self.item_map.weight.dtype))
        self.item_map.bias.copy_(solution[-1].to(self.item_map.bias.dtype))
        return float((x @ solution - e).norm() / e.norm())
