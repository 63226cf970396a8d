"""The `rank` objective of Stage 2: a small head that scores candidates from one forward pass.

The paper's objective (`generate`) trains F_U and F_I through the LM loss on the true title;
with a 135M LLM and the few thousand prompts a CPU affords, that does not learn (README,
"Stage 2"). Here the same prompt (F_U(x_u) at [UserRep], F_I(z_i) at every [HistoryEmb] and
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

The bypass (`allmrec.models.projection.BypassRanker`, the ablation row "A-LLMRec (rank, LLM
bypassed)") is the same head with its own F_U and F_I, reading F_U(x_u) in place of h_last
and F_I(z_c) in place of h_c: what the readout can do without the LLM, on the same examples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

READOUTS = ("candidate", "user_item")


def listwise_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy over each row's candidates; -inf scores (padding) take no mass.

    `scores` [B, C], `targets` [B]: the index of the true item among the row's candidates.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"listwise_loss: scores {tuple(scores.shape)}, targets {tuple(targets.shape)}: "
            "expected [B, C] and [B]"
        )
    return F.cross_entropy(scores.float(), targets)


def _head(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))


class RankReadout(nn.Module):
    """s_c for every candidate c of a prompt (`kind` as in the module docstring)."""

    def __init__(self, kind: str, d_llm: int, d_cf: int, d_joint: int, dim: int = 128) -> None:
        super().__init__()
        if kind not in READOUTS:
            raise ValueError(f"stage2.readout {kind!r}: expected one of {', '.join(READOUTS)}")
        self.kind = kind
        if kind == "candidate":
            self.user_head = _head(d_llm, dim)  # A
            self.item_head = _head(d_llm, dim)  # B
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # tau
        else:
            self.user_head = _head(d_llm, d_cf)  # A, zero: u = x_u at the start
            nn.init.zeros_(self.user_head[1].weight)
            nn.init.zeros_(self.user_head[1].bias)
            self.item_map = nn.Linear(d_joint, d_cf)  # g

    @property
    def scores_any_item(self) -> bool:
        """True when items not listed in the prompt can be scored (`item_keys`)."""
        return self.kind == "user_item"

    def user_query(self, h_user: Tensor, x_u: Tensor) -> Tensor:
        """`user_item`: u = x_u + A(h_user), [B, d_cf]."""
        return x_u.to(h_user.dtype) + self.user_head(h_user)

    def item_keys(self, z: Tensor) -> Tensor:
        """`user_item`: g(z_i) for any items, [..., d_cf]."""
        return self.item_map(z.to(self.item_map.weight.dtype))

    def forward(self, h_user: Tensor, h_cand: Tensor, x_u: Tensor, z_cand: Tensor) -> Tensor:
        """Scores [B, C] from h_user [B, d], h_cand [B, C, d] (the states at the candidates'
        tokens), x_u [B, d_cf] and z_cand [B, C, d_joint]."""
        if self.kind == "candidate":
            u = F.normalize(self.user_head(h_user), dim=-1)
            v = F.normalize(self.item_head(h_cand), dim=-1)
            return self.log_scale.exp() * torch.einsum("bd,bcd->bc", u, v)
        u = self.user_query(h_user, x_u)
        return torch.einsum("bd,bcd->bc", u, self.item_keys(z_cand))

    @torch.no_grad()
    def fit_item_map(self, z: Tensor, item_embeddings: Tensor, ridge: float = 1e-2) -> float:
        """`user_item`: g := the ridge least-squares map from z_i to the CF item embedding e_i
        over the catalogue (rows 0, padding, left out). Returns the relative error
        ||g(z) - e|| / ||e||. A no-op for `candidate`."""
        if self.kind != "user_item":
            return float("nan")
        z, e = z[1:].double(), item_embeddings[1:].double()
        x = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        solution = torch.linalg.solve(gram, x.T @ e)  # [d_joint + 1, d_cf]
        self.item_map.weight.copy_(solution[:-1].T.to(self.item_map.weight.dtype))
        self.item_map.bias.copy_(solution[-1].to(self.item_map.bias.dtype))
        return float((x @ solution - e).norm() / e.norm())
