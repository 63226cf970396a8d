"""What A-LLMRec needs from a collaborative-filtering backbone, and the backbones by name.

A-LLMRec is model-agnostic (docs/method.md, section 1): the frozen CF-RecSys only has
to hand over

- ``E``: its item embedding table, ``[num_items + 1, hidden]`` with row 0 the padding row,
  the table Stage 1 aligns with item text (``e_i = E[i]``);
- ``x_u``: a user representation ``[B, hidden]`` (for a sequential model, the last hidden
  state of the user's sequence), which Stage 1's ``L_rec`` scores as ``<x_u, e_i>`` and
  Stage 2 projects into the LLM with ``F_U``.

Conventions shared by every backbone:

- item ids are ``1..num_items``, 0 is padding; user ids are ``1..num_users``, 0 is unused;
- ``seqs`` is a LongTensor ``[B, L]`` left-padded with 0, the most recent item last, with
  ``L <= max_len``. Sequential models left-pad shorter inputs to ``max_len`` themselves, so the
  amount of left padding a caller adds never changes their output;
- training is the public SASRec port's: binary cross-entropy with logits, one sampled negative
  ``neg[b, t]`` per positive ``pos[b, t]`` (the item that follows position ``t``), positions
  where ``pos == 0`` masked out.

``build_backbone(name, num_items, num_users, **hparams)`` builds any of them; every model keeps
its hyperparameters in ``model.config``, a dataclass, so ``dataclasses.asdict(model.config)`` is
JSON and ``build_backbone(model.name, **that_dict)`` rebuilds the same architecture.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CFBackbone(nn.Module):
    """The interface of a CF backbone. Subclasses implement the four methods below.

    ``forward`` is ``training_loss``, so the model can be wrapped by DistributedDataParallel
    (which only synchronises gradients through ``forward``) and trained with
    ``loss = model(user_idx, seqs, pos, neg)``.
    """

    name: ClassVar[str]  # the key of this class in BACKBONES
    config_class: ClassVar[type]  # its hyperparameter dataclass
    config: Any
    hidden_dim: int
    num_items: int

    def item_embeddings(self) -> Tensor:
        """E: ``[num_items + 1, hidden]``; row 0 is the (zero) padding row."""
        raise NotImplementedError

    def user_representation(self, user_idx: Tensor, seqs: Tensor) -> Tensor:
        """x_u: ``[B, hidden]`` from user ids ``[B]`` and left-padded sequences ``[B, L]``."""
        raise NotImplementedError

    def score(self, user_idx: Tensor, seqs: Tensor, candidates: Tensor) -> Tensor:
        """Logits ``[B, C]`` for candidate item ids ``[B, C]``; higher = more likely next."""
        raise NotImplementedError

    def training_loss(self, user_idx: Tensor, seqs: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Scalar BCE loss; ``pos``/``neg`` are ``[B, L]`` item ids, ``pos == 0`` masked out."""
        raise NotImplementedError

    def forward(self, user_idx: Tensor, seqs: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        return self.training_loss(user_idx, seqs, pos, neg)


class SequentialBackbone(CFBackbone):
    """A backbone that outputs ``h_t`` per position and scores item i at t by ``<h_t, E_i>``.

    SASRec, GRU4Rec and NextItNet differ only in ``sequence_output``; ``x_u`` is ``h`` at the
    last position and training is the shared sampled BCE.
    """

    item_emb: nn.Embedding

    def sequence_output(self, seqs: Tensor) -> Tensor:
        """``h_t`` for every position: ``seqs [B, L]`` -> ``[B, L, hidden]``."""
        raise NotImplementedError

    def item_embeddings(self) -> Tensor:
        return self.item_emb.weight

    def user_representation(self, user_idx: Tensor, seqs: Tensor) -> Tensor:
        """x_u = h at the last position (``user_idx`` is unused)."""
        return self.sequence_output(seqs)[:, -1]

    def score(self, user_idx: Tensor, seqs: Tensor, candidates: Tensor) -> Tensor:
        return dot_scores(self.user_representation(user_idx, seqs), self.item_emb(candidates))

    def training_loss(self, user_idx: Tensor, seqs: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        check_targets(seqs, pos, neg)
        h = self.sequence_output(seqs)
        pos_logits = (h * self.item_emb(pos)).sum(-1)
        neg_logits = (h * self.item_emb(neg)).sum(-1)
        return sampled_bce_loss(pos_logits, neg_logits, pos)


# ---- helpers shared by the backbones -------------------------------------------------------


def xavier_init_(model: nn.Module) -> None:
    """Initialise like the public SASRec port's ``main.py``, then zero the padding rows.

    The port runs ``xavier_normal_`` on every parameter inside a try/except, which skips the
    1-D ones (biases, LayerNorm gains keep their PyTorch defaults). It also overwrites the
    padding row of the item table; here every ``nn.Embedding`` with a ``padding_idx`` gets that
    row set back to zero (``padding_idx`` keeps its gradient zero, so it stays zero).
    Deterministic under ``torch.manual_seed``.
    """
    for param in model.parameters():
        if param.dim() >= 2:
            nn.init.xavier_normal_(param)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def left_pad(seqs: Tensor, max_len: int) -> Tensor:
    """Left-pad ``seqs [B, L]`` with 0 to ``[B, max_len]``; ``L > max_len`` is an error."""
    if seqs.dim() != 2:
        raise ValueError(
            f"seqs: expected a [B, L] tensor of item ids, got shape {tuple(seqs.shape)}"
        )
    length = seqs.shape[1]
    if length > max_len:
        raise ValueError(
            f"seqs: length {length} exceeds the model's max_len {max_len}; "
            "keep only the most recent max_len items"
        )
    return F.pad(seqs, (max_len - length, 0), value=0)


def check_targets(seqs: Tensor, pos: Tensor, neg: Tensor) -> None:
    """``pos`` and ``neg`` must be ``[B, L]`` like ``seqs``."""
    if pos.shape != seqs.shape or neg.shape != seqs.shape:
        raise ValueError(
            f"pos/neg: expected the shape of seqs {tuple(seqs.shape)}, "
            f"got pos {tuple(pos.shape)} and neg {tuple(neg.shape)}"
        )


def dot_scores(x_u: Tensor, item_emb: Tensor) -> Tensor:
    """``<x_u, e_i>`` for every candidate: ``x_u [B, H]``, ``item_emb [B, C, H]`` -> ``[B, C]``."""
    return torch.einsum("bh,bch->bc", x_u, item_emb)


def sampled_bce_loss(pos_logits: Tensor, neg_logits: Tensor, pos: Tensor) -> Tensor:
    """BCE of the positive logits against 1 plus the negative logits against 0.

    Both are averaged over the positions where ``pos != 0``, as the reference computes
    ``bce(pos_logits[pos != 0], 1) + bce(neg_logits[pos != 0], 0)``. Masked positions contribute
    exactly nothing (``torch.where``, not a multiplication, so even an infinite logit there is
    harmless), and a batch with no valid position gives 0 instead of the reference's NaN.
    """
    valid = pos != 0
    loss = F.binary_cross_entropy_with_logits(
        pos_logits, torch.ones_like(pos_logits), reduction="none"
    ) + F.binary_cross_entropy_with_logits(
        neg_logits, torch.zeros_like(neg_logits), reduction="none"
    )
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum() / valid.sum().clamp(min=1)
