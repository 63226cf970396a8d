"""GRU4Rec (Hidasi et al., ICLR 2016), adapted to SASRec's training, as a CF backbone.

``E[s_t]`` -> dropout -> GRU -> ``h_t`` per position; the logit of item ``i`` after position
``t`` is ``<h_t, E_i>`` and ``x_u = h_{L-1}``, the GRU state after the most recent item.

Deviations from the original, so that every backbone hands A-LLMRec the same things and is
trained the same way: whole left-padded user sequences instead of session-parallel
mini-batches; the output layer is tied to the input table ``E`` (the original has a separate
feed-forward output layer) so ``E`` and ``x_u`` live in one space; the loss is SASRec's BCE with
one sampled negative per position instead of TOP1/BPR; Xavier-normal init like the SASRec port.
The GRU reads the padding too (zero vectors), so inputs are left-padded to ``max_len`` for
a result that does not depend on how much padding the caller adds. Dropout 0.3 on the
embeddings is our choice (RecBole's default for this model).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from allmrec.models.base import (
    SequentialBackbone,
    left_pad,
    xavier_init_,
)


@dataclass
class GRU4RecConfig:
    num_items: int
    num_users: int = 0  # not used by the model; kept so the config describes the data
    hidden_dim: int = 50
    max_len: int = 50
    num_layers: int = 1
    dropout_rate: float = 0.3

    def __post_init__(self) -> None:
        for field in ("num_items", "hidden_dim", "max_len", "num_layers"):
            if getattr(self, field) < 1:
                raise ValueError(
                    f"GRU4RecConfig.{field}: expected >= 1, got {getattr(self, field)}"
                )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"GRU4RecConfig.dropout_rate: expected in [0, 1), got {self.dropout_rate}"
            )


class GRU4Rec(SequentialBackbone):
    """Recurrent sequential recommender; ``E`` = ``item_emb.weight``, ``x_u`` = last GRU state."""

    name = "gru4rec"
    config_class = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_dim = config.hidden_dim
        self.num_items = config.num_items

        self.item_emb = nn.Embedding(config.num_items + 1, config.hidden_dim, padding_idx=0)  # E
        self.emb_dropout = nn.Dropout(config.dropout_rate)
        self.gru = nn.GRU(
            config.hidden_dim,
            config.hidden_dim,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout_rate if config.num_layers > 1 else 0.0,
        )

        xavier_init_(self)

    def sequence_output(self, seqs: Tensor) -> Tensor:
        """``h_t`` for every position: ``seqs [B, L]`` -> ``[B, L, hidden]``; causal by design."""
        start = self.config.max_len - seqs.shape[-1]  # the caller's positions in the padded input
        seqs = left_pad(seqs, self.config.max_len)
        h, _ = self.gru(self.emb_dropout(self.item_emb(seqs)))
        return h[:, start:]
