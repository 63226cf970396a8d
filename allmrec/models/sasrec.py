"""SASRec (Kang & McAuley, ICDM 2018): the CF-RecSys A-LLMRec freezes by default.

This follows the public PyTorch port (pmixer/SASRec.pytorch) in the version A-LLMRec's
``pre_train/sasrec/model.py`` ships, including its quirks:

- input: ``E[s_t] * sqrt(hidden) + P[t]`` (learned positions ``0..max_len-1``), dropout,
  then the *timeline mask* zeroes padded positions;
- each block: ``Q = LayerNorm(x)``; causal attention with query ``Q`` and keys/values the
  un-normed ``x``; ``x = Q + attn`` (the residual adds the *normed* input, as the port does);
  ``x = LayerNorm(x)``; ``x = x + FFN(x)`` (point-wise Conv1d k=1, ReLU, dropout); timeline mask;
- a final LayerNorm gives ``h_t``. The logit of item ``i`` after position ``t`` is
  ``<h_t, E_i>`` (the unscaled table), and ``x_u = h_{L-1}``, the last position.

No key-padding mask, as in the port: padded positions are zero vectors after the timeline mask
but still take softmax mass as keys (their key and value are the projection biases), so a
user's ``x_u`` depends on how many pads precede the items. That is why inputs are always
left-padded to ``max_len`` here: the positions and the number of pads then match the
reference's training data whatever length the caller passes. Parameter names match the port,
so its ``state_dict`` loads as is.

Hyperparameters are the reference's: hidden 50, max_len 50, 2 blocks, 1 head, dropout 0.5
(trained with Adam lr 1e-3, betas (0.9, 0.98), batch 128). LayerNorm eps is the port's 1e-8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from allmrec.models.base import (
    SequentialBackbone,
    left_pad,
    xavier_init_,
)


@dataclass
class SASRecConfig:
    num_items: int
    num_users: int = 0  # not used by the model; kept so the config describes the data
    hidden_dim: int = 50
    max_len: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout_rate: float = 0.5

    def __post_init__(self) -> None:
        for field in ("num_items", "hidden_dim", "max_len", "num_blocks", "num_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"SASRecConfig.{field}: expected >= 1, got {getattr(self, field)}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"SASRecConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"SASRecConfig.dropout_rate: expected in [0, 1), got {self.dropout_rate}"
            )


class PointWiseFeedForward(nn.Module):
    """``x + Dropout(Conv1d(Dropout(ReLU(Conv1d(x)))))`` (kernel 1, per position)."""

    def __init__(self, hidden_dim: int, dropout_rate: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(hidden_dim, hidden_dim, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(hidden_dim, hidden_dim, kernel_size=1)
        self.dropout2 = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, L, H]
        h = x.transpose(1, 2)  # Conv1d wants [B, H, L]
        h = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(h)))))
        return x + h.transpose(1, 2)


class SASRec(SequentialBackbone):
    """Self-attentive sequential recommender; ``E`` = ``item_emb.weight``, ``x_u`` = ``h_{L-1}``."""

    name = "sasrec"
    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_dim = config.hidden_dim
        self.num_items = config.num_items
        h = config.hidden_dim

        self.item_emb = nn.Embedding(config.num_items + 1, h, padding_idx=0)  # E
        self.pos_emb = nn.Embedding(config.max_len, h)  # P
        self.emb_dropout = nn.Dropout(config.dropout_rate)
        self.attention_layernorms = nn.ModuleList()
        self.attention_layers = nn.ModuleList()
        self.forward_layernorms = nn.ModuleList()
        self.forward_layers = nn.ModuleList()
        for _ in range(config.num_blocks):
            self.attention_layernorms.append(nn.LayerNorm(h, eps=1e-8))
            self.attention_layers.append(
                nn.MultiheadAttention(h, config.num_heads, config.dropout_rate, batch_first=True)
            )
            self.forward_layernorms.append(nn.LayerNorm(h, eps=1e-8))
            self.forward_layers.append(PointWiseFeedForward(h, config.dropout_rate))
        self.last_layernorm = nn.LayerNorm(h, eps=1e-8)

        xavier_init_(self)

    def sequence_output(self, seqs: Tensor) -> Tensor:
        """``h_t`` for every position: ``seqs [B, L]`` -> ``[B, L, hidden]`` (the port's log2feats).

        ``h_t`` depends only on items at positions ``<= t``; it predicts the item after ``t``.
        """
        start = self.config.max_len - seqs.shape[-1]  # the caller's positions in the padded input
        seqs = left_pad(seqs, self.config.max_len)
        keep = (seqs != 0).unsqueeze(-1)  # the timeline mask, True at real items
        positions = torch.arange(seqs.shape[1], device=seqs.device)

        x = self.item_emb(seqs) * self.hidden_dim**0.5 + self.pos_emb(positions)
        x = self.emb_dropout(x) * keep
        causal = torch.ones(seqs.shape[1], seqs.shape[1], dtype=torch.bool, device=seqs.device)
        causal = causal.triu(diagonal=1)  # True = may not attend (a later position)
        for attn_ln, attn, fwd_ln, fwd in zip(
            self.attention_layernorms,
            self.attention_layers,
            self.forward_layernorms,
            self.forward_layers,
            strict=True,
        ):
            q = attn_ln(x)
            attn_out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = q + attn_out
            x = fwd(fwd_ln(x)) * keep
        return self.last_layernorm(x)[:, start:]
