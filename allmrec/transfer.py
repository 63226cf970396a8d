"""Cross-domain (the paper's Table 7): a trained stack recommends for the users of another
prepared data set, with no training on it.

How the other data set's users and items enter the stack (docs/method.md, section 4):
- an item whose normalised title and release year match an item of the stack's catalogue is
  that item: it takes its CF embedding e_i, its joint embedding z_i, its q_i and its training
  interactions (what the stack knows of it);
- any other item enters by its text alone, as the paper's cold items do: q from the stack's
  Sentence-BERT over the item's own text, z = enc_T(q) through the stack's text encoder, no
  interactions;
- a user is their history: x_u is the stack's CF model over the matched items among its
  last `max_len` (the window every CF model reads; it has no embedding for the others); the
  CF backbone row scores the candidates with the same x_u, an unmatched candidate as the
  mean item embedding of the catalogue (the CF model's best guess for an item it never saw).

Only sequential CF models (SASRec, GRU4Rec, NextItNet) transfer: NCF's user embedding is of
the users it trained on.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from allmrec.data.prepared import load_prepared
from allmrec.models.base import SequentialBackbone
from allmrec.models.projection import normalize_title
from allmrec.sequences import left_pad

log = logging.getLogger(__name__)


def title_keys(run_dir: Path) -> list[str]:
    """The match key of every item by id (index 0 is padding): its normalised title and,
    where the item table has one, its release year."""
    table = pq.read_table(Path(run_dir) / "data" / "items.parquet")
    years = (
        table.column("release_year").to_pylist()
        if "release_year" in table.column_names
        else [None] * table.num_rows
    )
    keys = [""] * (table.num_rows + 1)
    for idx, title, year in zip(
        table.column("item_idx").to_pylist(), table.column("title").to_pylist(), years, strict=True
    ):
        keys[idx] = f"{normalize_title(title or '')}|{year or ''}"
    return keys


def match_items(source_run: Path, target_run: Path) -> np.ndarray:
    """By target item id: the source item with the same key, or 0 (none; index 0 is 0).

    A key that names no title ("No Title", the preparation's placeholder, or empty) matches
    nothing, and neither does one that two source items share: an item is matched only to the
    one item it certainly is. Few matches are reported (another title format, say)."""
    keys = title_keys(source_run)
    seen: dict[str, int] = {}
    for idx, key in enumerate(keys[1:], 1):
        seen[key] = 0 if key in seen else idx  # 0: ambiguous
    placeholder = {f"{normalize_title('No Title')}|", "|"}
    target = title_keys(target_run)
    matched = np.array(
        [
            0
            if not i or key in placeholder or key.startswith(f"{normalize_title('No Title')}|")
            else seen.get(key, 0)
            for i, key in enumerate(target)
        ]
    )
    if len(target) > 1 and (matched[1:] > 0).mean() < 0.1:
        log.warning(
            "cross-domain: %d of %d items of %s match an item of %s by title and year: the "
            "others enter by their text alone",
            int((matched[1:] > 0).sum()),
            len(target) - 1,
            target_run,
            source_run,
        )
    return matched


class MappedCF(nn.Module):
    """The source CF model over target item ids: histories keep their matched items (mapped to
    source ids, in order); candidates are scored by their source embedding, an unmatched one by
    the catalogue's mean embedding."""

    def __init__(self, cf: SequentialBackbone, mapping: np.ndarray) -> None:
        super().__init__()
        if not isinstance(cf, SequentialBackbone):
            raise ValueError(
                f"cross-domain: the CF model {type(cf).__name__} scores only the users it was "
                "trained on; a sequential one (sasrec, gru4rec, nextitnet) is needed"
            )
        self.cf = cf
        self.config = cf.config
        self.register_buffer("mapping", torch.as_tensor(mapping, dtype=torch.long))

    def item_embeddings(self) -> Tensor:
        source = self.cf.item_embeddings()
        table = source[self.mapping].clone()
        table[self.mapping == 0] = source[1:].mean(0)
        table[0] = 0
        return table

    def _source_seqs(self, seqs: Tensor) -> Tensor:
        mapped = self.mapping[seqs]
        kept = [row[row > 0].cpu().numpy() for row in mapped]
        return torch.as_tensor(left_pad(kept, seqs.shape[1]), device=seqs.device)

    def user_representation(self, user_idx: Tensor, seqs: Tensor) -> Tensor:
        return self.cf.user_representation(user_idx, self._source_seqs(seqs))

    def score(self, user_idx: Tensor, seqs: Tensor, candidates: Tensor) -> Tensor:
        x_u = self.user_representation(user_idx, seqs)
        return torch.einsum("bh,bch->bc", x_u, self.item_embeddings()[candidates])


@torch.no_grad()
def transferred_inputs(
    stack_dir: Path, source, target_dir: Path, title_template: str, max_text_tokens: int = 128
):
    """`Stage2Inputs` for the users and items of `target_dir`'s prepared data, through the
    stack of `stack_dir` (its `source` inputs) with no training on the target."""
    from allmrec.serving import _autoencoder
    from allmrec.text_encoder import load_sentence_encoder
    from allmrec.training.stage1 import encode_texts, item_texts
    from allmrec.training.stage2 import item_sections, item_titles

    stack_dir, target_dir = Path(stack_dir), Path(target_dir)
    data = load_prepared(target_dir)
    mapping = match_items(stack_dir, target_dir)
    matched = torch.as_tensor(mapping > 0)
    texts, _, _ = item_texts(data)
    encoder = load_sentence_encoder(str(stack_dir / "stage1" / "text_encoder"))
    q = torch.zeros(data.num_items + 1, source.q.shape[1])
    # as Stage 1 encoded the stack's own catalogue (its token limit)
    q[1:] = encode_texts(encoder, texts[1:], "cpu", max_tokens=max_text_tokens)
    text_ae = _autoencoder(stack_dir / "stage1" / "text_autoencoder.safetensors")
    rows = torch.as_tensor(mapping)
    z_text = torch.where(matched[:, None], source.z_text[rows], text_ae.encode(q))
    z_text[0] = 0
    z = torch.where(matched[:, None], source.z[rows], z_text)
    q = torch.where(matched[:, None], source.q[rows], q)
    counts = torch.where(matched, source.counts[rows], torch.zeros_like(rows))
    z_source = np.where(mapping > 0, "item", "text")
    cold, warm = item_sections(data)
    return replace(
        source,
        data=data,
        cf_model=MappedCF(source.cf_model, mapping).eval(),
        titles=item_titles(data, title_template),
        z=z,
        z_source=z_source,
        cold_items=cold,
        warm_items=warm,
        z_text=z_text,
        q=q,
        item_counts=counts,
        matched_items=int(matched[1:].sum()),
    )
