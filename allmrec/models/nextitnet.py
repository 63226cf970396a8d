"""NextItNet (Yuan et al., WSDM 2019) as a CF backbone.

A stack of residual blocks of dilated causal 1-D convolutions over the item embeddings
``E[s_t]``. Each block is the paper's block (b), as RecBole writes it::

    y = ReLU(LayerNorm(CausalConv(x, dilation=d)))
    y = ReLU(LayerNorm(CausalConv(y, dilation=2d)))
    x = x + y

Causality comes from left-padding each convolution with ``(kernel - 1) * dilation`` zeros, so
``h_t`` sees only positions ``<= t``. With kernel 3 and dilations (1, 2, 4, 1, 2, 4) the
receptive field is 85 positions, more than max_len 50. The logit of item ``i`` after position
``t`` is ``<h_t, E_i>`` and ``x_u = h_{L-1}``.

Deviations from the paper, so that every backbone hands A-LLMRec the same things and is trained
the same way: the output layer is tied to the input table ``E`` (the paper has a separate
softmax layer over all items); SASRec's BCE with one sampled negative per position replaces the
full softmax; Xavier-normal init like the SASRec port. Padded positions pass through the
convolution biases like any other, so inputs are left-padded to ``max_len`` for a result that
does not depend on how much padding the caller adds. ``dropout_rate`` (on the embeddings)
defaults to 0, the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from allmrec.models.base import (
    SequentialBackbone,
    left_pad,
    xavier_init_,
)


@dataclass
class NextItNetConfig:
    num_items: int
    num_users: int = 0  # not used by the model; kept so the config describes the data
    hidden_dim: int = 50
    max_len: int = 50
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 1, 2, 4)  # one residual block each (d, then 2d)
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        self.dilations = tuple(int(d) for d in self.dilations)  # a JSON list comes back a tuple
        for field in ("num_items", "hidden_dim", "max_len", "kernel_size"):
            if getattr(self, field) < 1:
                raise ValueError(
                    f"NextItNetConfig.{field}: expected >= 1, got {getattr(self, field)}"
                )
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(
                f"NextItNetConfig.dilations: expected a non-empty list of integers >= 1, "
                f"got {list(self.dilations)}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"NextItNetConfig.dropout_rate: expected in [0, 1), got {self.dropout_rate}"
            )


class CausalConv1d(nn.Conv1d):
    """A dilated Conv1d over ``[B, L, H]`` that left-pads so output ``t`` sees inputs ``<= t``."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__(channels, channels, kernel_size, dilation=dilation)
        self.left = (kernel_size - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, L, H]
        x = F.pad(x.transpose(1, 2), (self.left, 0))
        return super().forward(x).transpose(1, 2)


class ResidualBlock(nn.Module):
    """``x + ReLU(LN(conv_2d(ReLU(LN(conv_d(x))))))``: the paper's block (b)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = CausalConv1d(channels, kernel_size, dilation)
        self.ln1 = nn.LayerNorm(channels, eps=1e-8)
        self.conv2 = CausalConv1d(channels, kernel_size, 2 * dilation)
        self.ln2 = nn.LayerNorm(channels, eps=1e-8)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.ln1(self.conv1(x)))
        y = F.relu(self.ln2(self.conv2(y)))
        return x + y


class NextItNet(SequentialBackbone):
    """Convolutional sequential recommender; ``E`` = ``item_emb.weight``, ``x_u`` = ``h_{L-1}``."""

    name = "nextitnet"
    config_class = NextItNetConfig

    def __init__(self, config: NextItNetConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_dim = config.hidden_dim
        self.num_items = config.num_items

        self.item_emb = nn.Embedding(config.num_items + 1, config.hidden_dim, padding_idx=0)  # E
        self.emb_dropout = nn.Dropout(config.dropout_rate)
        self.blocks = nn.ModuleList(
            ResidualBlock(config.hidden_dim, config.kernel_size, d) for d in config.dilations
        )

        xavier_init_(self)

    def sequence_output(self, seqs: Tensor) -> Tensor:
        """``h_t`` for every position: ``seqs [B, L]`` -> ``[B, L, hidden]``; causal by design."""
        start = self.config.max_len - seqs.shape[-1]  # the caller's positions in the padded input
        seqs = left_pad(seqs, self.config.max_len)
        x = self.emb_dropout(self.item_emb(seqs))
        for block in self.blocks:
            x = block(x)
        return x[:, start:]
