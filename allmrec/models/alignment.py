"""Stage 1 of A-LLMRec: collaborative-text alignment through two autoencoders.

Symbols as in the paper (docs/method.md, section 2):
- e_i: item i's row of the frozen CF item table E; x_u: the frozen CF user representation;
- q_i: the Sentence-BERT embedding of item text Q_i = "{title}, {description}" (the text encoder
  is fine-tuned in this stage);
- item autoencoder: enc_I = Linear(d_cf -> 128) + Sigmoid, dec_I = Linear(128 -> d_cf);
- text autoencoder: enc_T = Linear(d_text -> 128) + Sigmoid, dec_T = Linear(128 -> d_text);
- joint embedding z_i = enc_I(e_i), or enc_T(q_i) for an item with no interactions (cold).

loss = L_match + alpha * L_item_recon + beta * L_text_recon + L_rec, each term over the
positive and the negative item of every user in the batch:
- L_match = MSE(enc_I(e_i), enc_T(q_i));
- L_item_recon = MSE(dec_I(enc_I(e_i)), e_i); L_text_recon = MSE(dec_T(enc_T(q_i)), q_i) with the
  target q_i detached (the encoder is not pulled towards its own reconstruction);
- L_rec = BCE(s(x_u, dec_I(enc_I(e_pos))), 1) + BCE(s(x_u, dec_I(enc_I(e_neg))), 0).

Where the paper writes the score s as the dot product <x_u, .>, this follows the authors'
reference code, which takes the mean of the element-wise product (the dot product / d_cf);
the two differ by a constant scale that the sigmoid sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Autoencoder(nn.Module):
    """enc = Linear(in -> latent) + Sigmoid; dec = Linear(latent -> in)."""

    def __init__(self, in_dim: int, latent_dim: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, latent_dim), nn.Sigmoid())
        self.decoder = nn.Linear(latent_dim, in_dim)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


@dataclass
class Stage1Losses:
    total: Tensor
    match: Tensor
    item_recon: Tensor
    text_recon: Tensor
    rec: Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            k: float(getattr(self, k).detach())
            for k in ("total", "match", "item_recon", "text_recon", "rec")
        }


def stage1_losses(
    item_ae: Autoencoder,
    text_ae: Autoencoder,
    x_u: Tensor,
    e_pos: Tensor,
    e_neg: Tensor,
    q_pos: Tensor,
    q_neg: Tensor,
    alpha: float,
    beta: float,
) -> Stage1Losses:
    """The four terms and their weighted sum for a batch of (user, positive, negative)."""
    z_pos, e_pos_hat = item_ae(e_pos)
    z_neg, e_neg_hat = item_ae(e_neg)
    zt_pos, q_pos_hat = text_ae(q_pos)
    zt_neg, q_neg_hat = text_ae(q_neg)
    match = F.mse_loss(z_pos, zt_pos) + F.mse_loss(z_neg, zt_neg)
    item_recon = F.mse_loss(e_pos_hat, e_pos) + F.mse_loss(e_neg_hat, e_neg)
    text_recon = F.mse_loss(q_pos_hat, q_pos.detach()) + F.mse_loss(q_neg_hat, q_neg.detach())
    pos_logits = (x_u * e_pos_hat).mean(dim=-1)
    neg_logits = (x_u * e_neg_hat).mean(dim=-1)
    rec = F.binary_cross_entropy_with_logits(
        pos_logits, torch.ones_like(pos_logits)
    ) + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
    total = match + alpha * item_recon + beta * text_recon + rec
    return Stage1Losses(total, match, item_recon, text_recon, rec)


class CollabTextAligner(nn.Module):
    """The trainable part of Stage 1: the Sentence-BERT and both autoencoders.

    The CF backbone is not in here: it is frozen and its e_i and x_u come in as tensors, so a
    DeepSpeed engine around this module partitions and trains only what Stage 1 trains. A
    frozen Sentence-BERT is left out the same way (`text_encoder=None`, q_i come in computed).
    """

    def __init__(
        self, text_encoder: nn.Module | None, cf_dim: int, text_dim: int, latent_dim: int = 128
    ) -> None:
        super().__init__()
        # A SentenceTransformer (an nn.Sequential); None where a frozen encoder's q_i come in
        # computed (a Stage 1 worker never loads one then).
        self.text_encoder = text_encoder
        self.item_ae = Autoencoder(cf_dim, latent_dim)
        self.text_ae = Autoencoder(text_dim, latent_dim)

    def embed_text(self, features: dict[str, Tensor]) -> Tensor:
        """q_i from tokenized texts (the output of `SentenceTransformer.tokenize`)."""
        if self.text_encoder is None:
            raise ValueError("this aligner has no text encoder: pass q_i, not texts")
        return self.text_encoder(features)["sentence_embedding"]

    def forward(
        self,
        x_u: Tensor,
        e_pos: Tensor,
        e_neg: Tensor,
        pos_features: dict[str, Tensor] | Tensor,
        neg_features: dict[str, Tensor] | Tensor,
        alpha: float,
        beta: float,
    ) -> Tensor:
        losses = self.losses(x_u, e_pos, e_neg, pos_features, neg_features, alpha, beta)
        return losses.total

    def losses(
        self,
        x_u: Tensor,
        e_pos: Tensor,
        e_neg: Tensor,
        pos_features: dict[str, Tensor] | Tensor,
        neg_features: dict[str, Tensor] | Tensor,
        alpha: float,
        beta: float,
    ) -> Stage1Losses:
        """Texts come tokenized, or as q_i already (a frozen text encoder's cached output)."""
        q_pos = pos_features if isinstance(pos_features, Tensor) else self.embed_text(pos_features)
        q_neg = neg_features if isinstance(neg_features, Tensor) else self.embed_text(neg_features)
        return stage1_losses(
            self.item_ae, self.text_ae, x_u, e_pos, e_neg, q_pos, q_neg, alpha, beta
        )

    def joint_item_embeddings(self, e: Tensor, q: Tensor, cold: Tensor) -> Tensor:
        """z_i for every item: enc_I(e_i), or enc_T(q_i) where `cold` (no interactions)."""
        return torch.where(cold[:, None], self.text_ae.encode(q), self.item_ae.encode(e))


def set_text_encoder_trainable(text_encoder: nn.Module, mode: str) -> int:
    """'all', 'frozen' or 'last:N' (the last N transformer layers, plus the pooler if any).

    Returns the number of trainable parameters. Full fine-tuning is what the paper does; on a
    CPU the last layers cost a fraction of it.
    """
    params = list(text_encoder.parameters())
    if mode == "all":
        for p in params:
            p.requires_grad_(True)
    elif mode == "frozen":
        for p in params:
            p.requires_grad_(False)
    elif mode.startswith("last:"):
        try:
            n = int(mode.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"stage1.text_encoder_trainable {mode!r}: expected last:N") from None
        for p in params:
            p.requires_grad_(False)
        layers = _transformer_layers(text_encoder)
        if n < 1 or n > len(layers):
            raise ValueError(
                f"stage1.text_encoder_trainable {mode!r}: the encoder has {len(layers)} layers"
            )
        for layer in layers[-n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    else:
        raise ValueError(
            f"stage1.text_encoder_trainable {mode!r}: expected 'all', 'frozen' or 'last:N'"
        )
    return sum(p.numel() for p in params if p.requires_grad)


def _transformer_layers(text_encoder: nn.Module) -> list[nn.Module]:
    for module in text_encoder.modules():
        layers = getattr(getattr(module, "encoder", None), "layer", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
        layers = getattr(getattr(module, "transformer", None), "layer", None)
        if isinstance(layers, nn.ModuleList):  # DistilBERT
            return list(layers)
    raise ValueError("cannot find the transformer layers of the text encoder for last:N")
