"""NCF / NeuMF (He et al., WWW 2017) as a CF backbone: the one non-sequential option.

NeuMF fuses two paths over separate user and item embeddings:

- GMF: ``P_u * Q_i`` (element-wise), ``hidden_dim`` factors;
- MLP: ``MLP([U_u ; V_i])``, a ReLU tower over ``mlp_layers`` (first entry = the concatenated
  embedding size, last = its predictive factors);

and predicts ``y_ui = h^T [P_u * Q_i ; MLP(...)] + b``, the logit that ``score`` returns.

What A-LLMRec gets (our choice; the paper does not say how it used NCF):

- ``E = Q``, the GMF item table ``[num_items + 1, hidden_dim]``;
- ``x_u = P_u * h_GMF``, the GMF user embedding scaled by the prediction layer's GMF weights, so
  ``<x_u, e_i> = h_GMF^T (P_u * Q_i)`` is exactly the GMF path's contribution to ``y_ui``, a
  quantity the model was trained on; ``<P_u, Q_i>`` alone would weight every factor equally,
  which NeuMF never does.

The model ignores ``seqs``: ``user_idx`` is its whole input. ``training_loss`` takes the same
per-position ``pos``/``neg`` as the sequential models and treats every ``pos[b, t] != 0`` as an
observed (user ``b``, item) pair with ``neg[b, t]`` its sampled negative; the loss is SASRec's
BCE (NeuMF's log loss with one negative per positive instead of the paper's four).
Xavier-normal init like the SASRec port, not the paper's Gaussian / GMF-MLP pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from allmrec.models.base import CFBackbone, check_targets, sampled_bce_loss, xavier_init_


@dataclass
class NCFConfig:
    num_items: int
    num_users: int
    hidden_dim: int = 50  # GMF factors: the size of E and x_u
    mlp_layers: tuple[int, ...] = (64, 32, 16)  # user and item MLP embeddings are 32 each
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        self.mlp_layers = tuple(int(n) for n in self.mlp_layers)  # a JSON list comes back a tuple
        for field in ("num_items", "num_users", "hidden_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"NCFConfig.{field}: expected >= 1, got {getattr(self, field)}")
        if not self.mlp_layers or min(self.mlp_layers) < 1 or self.mlp_layers[0] % 2:
            raise ValueError(
                "NCFConfig.mlp_layers: expected positive sizes, the first one even "
                f"(user and item halves), got {list(self.mlp_layers)}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"NCFConfig.dropout_rate: expected in [0, 1), got {self.dropout_rate}")


class NCF(CFBackbone):
    """Neural matrix factorisation; ``E`` = GMF item table, ``x_u`` = ``P_u * h_GMF``."""

    name = "ncf"
    config_class = NCFConfig

    def __init__(self, config: NCFConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_dim = config.hidden_dim
        self.num_items = config.num_items
        half = config.mlp_layers[0] // 2

        self.user_gmf = nn.Embedding(config.num_users + 1, config.hidden_dim, padding_idx=0)  # P
        self.item_gmf = nn.Embedding(config.num_items + 1, config.hidden_dim, padding_idx=0)  # E
        self.user_mlp = nn.Embedding(config.num_users + 1, half, padding_idx=0)
        self.item_mlp = nn.Embedding(config.num_items + 1, half, padding_idx=0)
        tower: list[nn.Module] = []
        for n_in, n_out in zip(config.mlp_layers[:-1], config.mlp_layers[1:], strict=True):
            tower += [nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(config.dropout_rate)]
        self.mlp = nn.Sequential(*tower)
        self.predict = nn.Linear(config.hidden_dim + config.mlp_layers[-1], 1)  # h, b

        xavier_init_(self)

    def logits(self, user_idx: Tensor, items: Tensor) -> Tensor:
        """NeuMF's ``y_ui`` for users ``[B]`` and items ``[B, C]`` -> ``[B, C]``."""
        gmf = self.user_gmf(user_idx).unsqueeze(1) * self.item_gmf(items)
        user_mlp = self.user_mlp(user_idx).unsqueeze(1).expand(-1, items.shape[1], -1)
        mlp = self.mlp(torch.cat([user_mlp, self.item_mlp(items)], dim=-1))
        return self.predict(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)

    def item_embeddings(self) -> Tensor:
        return self.item_gmf.weight

    def user_representation(self, user_idx: Tensor, seqs: Tensor | None = None) -> Tensor:
        """x_u = ``P_u * h_GMF`` (``seqs`` is ignored)."""
        h_gmf = self.predict.weight[0, : self.hidden_dim]
        return self.user_gmf(user_idx) * h_gmf

    def score(self, user_idx: Tensor, seqs: Tensor | None, candidates: Tensor) -> Tensor:
        """The full NeuMF logit of each candidate (``seqs`` is ignored)."""
        return self.logits(user_idx, candidates)

    def training_loss(self, user_idx: Tensor, seqs: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        check_targets(seqs, pos, neg)
        return sampled_bce_loss(self.logits(user_idx, pos), self.logits(user_idx, neg), pos)
