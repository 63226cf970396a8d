"""Serving the trained stack: the two halves that Ray Serve puts in separate deployments
(`serve_app/`); the request and answer types are `allmrec.api`'s. Plain PyTorch; nothing here
knows Ray.

- `StackRecommender` (CPU): the CF backbone, Stage 1's text path (the fine-tuned Sentence-BERT
  and the text encoder enc_T), the joint item embeddings z_i and the catalogue. It resolves a
  request into item indices, computes x_u, retrieves a shortlist from the whole catalogue by
  <x_u, dec_I(z_i)> (Stage 1's scoring, which covers items added at run time), and adds new
  items from their text alone: z = enc_T(q), the paper's cold-item route, no retraining.
- `StackLLM`: the frozen LLM with the trained projectors; for a batch of requests at once,
  ranks a user's candidates (by the readout of a stack trained with the `rank` objective, else
  by the likelihood of their titles) or generates the paper's answer. With the `user_item`
  readout it also returns the user vector u, with which `StackRecommender.catalogue_top`
  ranks the whole catalogue (items added at run time too) when a request lists no candidates.

Artifacts are read from safetensors, Parquet and JSON only.
"""

from __future__ import annotations

import hashlib
import string
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from allmrec.api import BadRequest, ItemInfo, NewItem, RecommendRequest
from allmrec.config import Config
from allmrec.manifest import file_sha256
from allmrec.models.alignment import Autoencoder
from allmrec.models.base import SequentialBackbone
from allmrec.models.projection import Stage2Example
from allmrec.models.readout import RankReadout
from allmrec.prompts import build_prompt, shuffle_candidates
from allmrec.stages import read_manifest


@dataclass
class Limits:
    max_history: int = 200
    max_candidates: int = 50
    shortlist: int = 20  # candidates retrieved when a request gives none (the paper's 20)


# ---------------------------------------------------------------------------------------------
# The CPU half.


class StackRecommender:
    """CF backbone + Stage 1 text path + joint embeddings + the catalogue of `run_dir`."""

    def __init__(self, run_dir: str | Path, limits: Limits | None = None) -> None:
        from allmrec.text_encoder import load_sentence_encoder
        from allmrec.training.stage2 import load_stage2_inputs

        self.run_dir = Path(run_dir)
        self.limits = limits or Limits()
        stage2 = read_manifest(self.run_dir / "stage2", "stage2")
        self.config = Config.model_validate(stage2["config"])
        self.version = model_version(self.run_dir, stage2)
        inputs = load_stage2_inputs(self.run_dir, self.config)
        self.data, self.cf_model = inputs.data, inputs.cf_model
        self.titles = list(inputs.titles)
        self.z = inputs.z.clone()
        self.source = list(inputs.z_source)
        items = pq.read_table(
            self.data.directory / "items.parquet", columns=["item_idx", "item_id"]
        )
        self.item_ids = [""] * (self.data.num_items + 1)
        for idx, item_id in zip(
            items.column("item_idx").to_pylist(), items.column("item_id").to_pylist(), strict=True
        ):
            self.item_ids[idx] = str(item_id)
        self.item_index = {item_id: idx for idx, item_id in enumerate(self.item_ids) if idx}
        users = pq.read_table(
            self.data.directory / "users.parquet", columns=["user_idx", "user_id"]
        )
        self.user_index = {
            str(u): int(i)
            for i, u in zip(
                users.column("user_idx").to_pylist(),
                users.column("user_id").to_pylist(),
                strict=True,
            )
        }
        self.q = inputs.q.clone()  # Sentence-BERT q_i: the text-aware readout reads them
        self.counts = [int(n) for n in inputs.counts]  # training interactions (added: 0)
        self.added: dict[int, tuple[str, str]] = {}  # index -> (title, description) as added
        stage1 = self.run_dir / "stage1"
        # eval mode for good: `encode_texts` restores the mode it found, and a module loaded
        # in training mode would turn dropout back on under another thread's concurrent add.
        self.text_encoder = load_sentence_encoder(str(stage1 / "text_encoder")).eval()
        self.text_ae = _autoencoder(stage1 / "text_autoencoder.safetensors")
        self.item_ae = _autoencoder(stage1 / "item_autoencoder.safetensors")
        with torch.no_grad():
            self.decoded = self.item_ae.decoder(self.z)  # dec_I(z_i): retrieval keys
        # the user_item readouts' scorer, or None
        self.readout = _readout(self.run_dir, self.config)
        self.template = self.config.data.text_template
        self.max_tokens = self.config.stage1.max_text_tokens
        self.sequential = isinstance(self.cf_model, SequentialBackbone)
        # Serve calls a replica's methods on several threads at once: the catalogue (ids,
        # titles, z, q, counts and the index) changes only under this lock, and readers take
        # it too, so no request sees an item half added or one item's row under another's id.
        self.lock = threading.RLock()
        self._keys = None  # (catalogue length, `catalogue_keys`..., counts): `_catalogue_keys`

    # -- requests -------------------------------------------------------------------------

    def _item(self, item_id: str, field: str) -> int:
        idx = self.item_index.get(str(item_id))
        if idx is None:
            raise BadRequest(field, f"unknown item id {item_id!r}", 404)
        return idx

    def resolve(self, request: RecommendRequest) -> tuple[int, list[int], list[int] | None]:
        """(user index or 0, history indices, candidate indices or None), checked."""
        if (request.user_id is None) == (request.history is None):
            raise BadRequest("user_id", "give exactly one of user_id and history")
        user = 0
        if request.user_id is not None:
            user = self.user_index.get(str(request.user_id), 0)
            if not user:
                raise BadRequest("user_id", f"unknown user id {request.user_id!r}", 404)
            history = [int(i) for i in self.data.history(user, "test")]
        else:
            _check_length(
                "history", request.history, self.limits.max_history, "at least one item id"
            )
            if not self.sequential:
                raise BadRequest(
                    "history", "this stack's CF backbone (NCF) needs a user_id, not a history"
                )
            history = [self._item(i, f"history[{n}]") for n, i in enumerate(request.history)]
        candidates = None
        if request.candidates is not None:
            _check_length(
                "candidates",
                request.candidates,
                self.limits.max_candidates,
                "item ids, or leave it out",
            )
            candidates = [
                self._item(i, f"candidates[{n}]") for n, i in enumerate(request.candidates)
            ]
            if len(set(candidates)) != len(candidates):
                raise BadRequest("candidates", "an item id appears twice")
        if request.k > self.limits.max_candidates:
            raise BadRequest("k", f"{request.k} is more than {self.limits.max_candidates}")
        return user, history, candidates

    @torch.no_grad()
    def user_vector(self, user: int, history: list[int]) -> torch.Tensor:
        """x_u of the frozen CF backbone over `history`, [d_cf]."""
        from allmrec.sequences import left_pad

        max_len = self.cf_model.config.max_len
        # Items added at run time have no CF embedding: the CF model sees the others only.
        known = [i for i in history if i <= self.data.num_items]
        seqs = torch.as_tensor(left_pad([np.asarray(known, dtype=np.int64)], max_len))
        return self.cf_model.user_representation(torch.tensor([user]), seqs)[0].float()

    @torch.no_grad()
    def shortlist(self, x_u: torch.Tensor, exclude: list[int], n: int) -> list[int]:
        """The top `n` items of the whole catalogue (added items too) by <x_u, dec_I(z_i)>."""
        scores = self.decoded @ x_u
        scores[0] = -torch.inf
        scores[torch.as_tensor(exclude, dtype=torch.long)] = -torch.inf
        n = min(n, int(torch.isfinite(scores).sum()))
        return torch.topk(scores, n).indices.tolist()

    @property
    def ranks_catalogue(self) -> bool:
        """True when the stack's readout scores any item: requests without candidates then
        rank the whole catalogue."""
        return self.readout is not None

    @torch.no_grad()
    def catalogue_top(self, query: list[float], history: list[int], k: int) -> list[tuple]:
        """The top `k` (item index, score) of the whole catalogue (added items too) by the
        user_item readouts' score of `query`; the history left out."""
        with self.lock:
            keys, text_keys, counts = self._catalogue_keys()
        max_history = self.config.stage2.max_history
        shown = min(len(history), max_history) if max_history else 0  # the prompt's history
        scores = self.readout.catalogue_scores(
            torch.tensor([query]), keys, text_keys, counts, torch.tensor([shown])
        )[0]
        scores[0] = -torch.inf
        scores[torch.as_tensor(history, dtype=torch.long)] = -torch.inf
        top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
        return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))

    def _catalogue_keys(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The readout's `catalogue_keys` of the whole catalogue and its counts, computed once
        per catalogue (items are only ever appended: its length is its version); the content
        path's item side is an MLP over every q_i, too slow to repeat per request. Called
        under the lock."""
        if self._keys is None or self._keys[0] != len(self.item_ids):
            q = self.q if self.readout.reads_text else None
            counts = torch.tensor(self.counts)
            self._keys = (
                len(self.item_ids),
                *self.readout.catalogue_keys(self.z, q, counts),
                counts,
            )
        return self._keys[1:]

    def llm_request(self, request: RecommendRequest) -> dict:
        """Everything the LLM half needs for one request (small: titles and vectors)."""
        with self.lock:  # one consistent view of the catalogue for the whole request
            user, history, candidates = self.resolve(request)
            x_u = self.user_vector(user, history)
            source = "request"
            if candidates is None:
                candidates = self.shortlist(x_u, history, self.limits.shortlist)
                catalogue = self.ranks_catalogue and request.mode == "rank"
                source = "catalogue" if catalogue else "retrieval"
            max_history = self.config.stage2.max_history
            shown = history[-max_history:] if max_history else []
            needed = sorted(set(shown) | set(candidates))
            seed = user or int(hashlib.sha256(str(history).encode()).hexdigest()[:8], 16)
            rows = torch.as_tensor(needed, dtype=torch.long)
            return {
                "history": shown,
                "candidates": candidates,
                "titles": {i: self.titles[i] for i in needed},
                "item_ids": {i: self.item_ids[i] for i in candidates},
                # arrays, not lists of floats: Ray moves them as buffers, not element by element
                "items": needed,
                "z": self.z[rows].numpy(),
                "q": self.q[rows].numpy(),
                "counts": {i: self.counts[i] for i in needed},
                "x_u": x_u.numpy(),
                "history_all": history,
                # by id: another replica may number its added items otherwise
                "history_ids": [self.item_ids[i] for i in history],
                "k": request.k,
                "mode": request.mode,
                "candidates_from": source,
                "shuffle_seed": seed,
            }

    def indices_of(self, item_ids: list[str]) -> list[int]:
        """This process's indices of `item_ids` (ids it does not know are left out)."""
        with self.lock:
            return [self.item_index[i] for i in item_ids if i in self.item_index]

    def catalogue_items(self, indices: list[int]) -> list[tuple[str, str]]:
        """(item id, title) of catalogue indices."""
        with self.lock:
            return [(self.item_ids[i], self.titles[i]) for i in indices]

    # -- the catalogue --------------------------------------------------------------------

    def item_info(self, item_id: str) -> ItemInfo:
        with self.lock:
            return self._info(self._item(item_id, "item_id"))

    def _info(self, idx: int) -> ItemInfo:
        return ItemInfo(
            item_id=self.item_ids[idx],
            title=self.titles[idx],
            source=self.source[idx],
            train_interactions=self.counts[idx],
        )

    def joint_embedding(self, item_id: str) -> list[float]:
        """The item's joint embedding z_i as this process holds it (an added item's too)."""
        with self.lock:
            return self.z[self._item(item_id, "item_id")].tolist()

    def added_items(self) -> list[tuple[str, str, list[float]]]:
        """(item id, title, z) of every item added at run time, in the order added."""
        with self.lock:
            return [(self.item_ids[i], self.titles[i], self.z[i].tolist()) for i in self.added]

    def item_text(self, item: NewItem) -> str:
        """Q_i of a new item: the data's text template over its title and description."""
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        values = {name: "" for name in fields} | {
            "title": item.title.strip(),
            "description": item.description.strip() or "No Description",
        }
        return " ".join(self.template.format(**values).split())

    @torch.no_grad()
    def encode_item(self, item: NewItem) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, z = enc_T(q)) of a new item from its text alone, q from the stack's
        Sentence-BERT: the slow part of adding, done outside the lock."""
        from allmrec.training.stage1 import encode_texts

        # as Stage 1 encoded the catalogue: its token limit, its pooling
        q = encode_texts(
            self.text_encoder, [self.item_text(item)], "cpu", max_tokens=self.max_tokens
        )
        return q, self.text_ae.encode(q)

    @torch.no_grad()
    def add_item(self, item: NewItem, encoded=None) -> tuple[ItemInfo, bool]:
        """A new item from its text alone (the paper's cold-item route, no retraining):
        (its info, True) when added; (the info of the item there, False) when an item with
        this id was added before with the same title and description (a retried add).
        Another item under the id is a 409. `encoded`: `encode_item`'s (q, z), if known."""
        item_id = item.item_id or f"new-{uuid.uuid4().hex[:10]}"
        content = item_content(item)
        with self.lock:
            if item_id in self.item_index:
                return self._existing(item_id, content), False
        q, z = encoded if encoded is not None else self.encode_item(item)
        with self.lock:
            if item_id in self.item_index:  # added by another thread meanwhile
                return self._existing(item_id, content), False
            idx = len(self.item_ids)
            self.z = torch.cat([self.z, z])
            self.q = torch.cat([self.q, q])
            self.decoded = torch.cat([self.decoded, self.item_ae.decoder(z)])
            self.item_ids.append(item_id)
            self.titles.append(content[0])
            self.source.append("added")
            self.counts.append(0)
            self.added[idx] = content
            self.item_index[item_id] = idx
            return self._info(idx), True

    def _existing(self, item_id: str, content: tuple[str, str]) -> ItemInfo:
        idx = self.item_index[item_id]
        if self.added.get(idx) != content:
            raise BadRequest("item_id", f"item id {item_id!r} exists already", 409)
        return self._info(idx)


def item_content(item: NewItem) -> tuple[str, str]:
    """What makes two adds of one id the same item: the title with its whitespace collapsed
    and the description stripped (a retried add equals its first try)."""
    return " ".join(item.title.split()), item.description.strip()


def _check_length(field: str, ids: list[str], limit: int, wanted: str) -> None:
    if not ids:
        raise BadRequest(field, f"empty: give {wanted}")
    if len(ids) > limit:
        raise BadRequest(field, f"{len(ids)} items, more than the limit of {limit}")


def _readout(run_dir: Path, config: Config) -> RankReadout | None:
    """The user_item readouts' item scorer (g and, for user_item_text, the text path and its
    weights), from the Stage 2 weights; None for a stack whose readout scores only the
    candidates in its prompt."""
    from allmrec.training.stage2 import load_stack_weights, text_options, text_width

    weights = load_stack_weights(run_dir / "stage2")
    if "readout.item_map.weight" not in weights:
        return None
    d_cf, d_joint = weights["readout.item_map.weight"].shape
    d_llm = weights["readout.user_head.0.weight"].shape[0]
    d_text = text_width(weights)
    kind = "user_item" if d_text is None else "user_item_text"
    options = text_options(config, weights)
    readout = RankReadout(kind, d_llm, d_cf, d_joint, d_text=d_text, **options)
    prefix = "readout."
    readout.load_state_dict(
        {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    )
    return readout.eval()


def _autoencoder(path: Path) -> Autoencoder:
    weights = load_file(str(path))
    latent, in_dim = weights["encoder.0.weight"].shape
    module = Autoencoder(in_dim, latent)
    module.load_state_dict(weights)
    return module.eval()


def model_version(run_dir: Path, stage2_manifest: dict) -> str:
    from allmrec.training.stage2 import PROJECTORS_FILE

    digest = file_sha256(Path(run_dir) / "stage2" / PROJECTORS_FILE)[:12]
    return f"{stage2_manifest['llm']['name']}+projectors:{digest}"


# ---------------------------------------------------------------------------------------------
# The LLM half.


class StackLLM:
    """The frozen LLM with `run_dir`'s trained projectors."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", dtype: str | None = None) -> None:
        from allmrec.training.stage2 import load_projected_llm

        self.model, self.config = load_projected_llm(Path(run_dir), device, dtype)

    @property
    def dtype(self) -> str:
        """The dtype the LLM runs in ("float32", "bfloat16"), as loaded."""
        return str(next(self.model.llm.parameters()).dtype).removeprefix("torch.")

    def _example(self, req: dict) -> Stage2Example:
        titles = {int(k): v for k, v in req["titles"].items()}
        # copies: arrays that come through Ray's object store are read-only
        z_rows, q_rows = torch.as_tensor(np.array(req["z"])), torch.as_tensor(np.array(req["q"]))
        z = {int(i): z_rows[n] for n, i in enumerate(req["items"])}
        q = {int(i): q_rows[n] for n, i in enumerate(req["items"])}
        counts = {int(k): int(v) for k, v in req["counts"].items()}
        order = shuffle_candidates(req["candidates"], int(req["shuffle_seed"]))
        prompt = build_prompt(
            req["history"], order, titles, self.config.data.domain, self.config.stage2.max_history
        )
        return Stage2Example(
            prompt, torch.as_tensor(np.array(req["x_u"])), z, item_text=q, item_counts=counts
        )

    def answer(self, requests: list[dict], max_new_tokens: int = 24) -> list[dict]:
        """Ranked items (and generated text, and the readout's user vector) for each request;
        rank-objective scoring and generation are batched."""
        out: list[dict] = [{} for _ in requests]
        examples = [self._example(r) for r in requests]
        ranked = [n for n, r in enumerate(requests) if r["mode"] == "rank"]
        if ranked and self.model.objective == "rank":
            self._rank_by_readout([examples[n] for n in ranked], [out[n] for n in ranked])
        else:
            for n in ranked:
                example = examples[n]
                titles = [requests[n]["titles"][i] for i in example.prompt.candidate_items]
                result = self.model.rank_candidates(
                    example.prompt, example.user_vector, example.item_vectors, titles
                )
                out[n]["items"] = [
                    (int(i), float(result.scores[j]))
                    for i, j in zip(result.items, result.order, strict=True)
                ]
        generate = [n for n, r in enumerate(requests) if r["mode"] == "generate"]
        if generate:
            texts = self.model.generate([examples[n] for n in generate], max_new_tokens)
            for n, text in zip(generate, texts, strict=True):
                req = requests[n]
                lowered = text.lower()
                named = [i for i in req["candidates"] if req["titles"][i].lower() in lowered]
                rest = [i for i in req["candidates"] if i not in named]
                out[n]["items"] = [(i, None) for i in named + rest]
                out[n]["generated"] = text
        return out

    @torch.no_grad()
    def _rank_by_readout(self, examples: list[Stage2Example], out: list[dict]) -> None:
        batch = self.model.collate(examples).to(self.model.device)
        scores, query = self.model.rank_forward(batch)
        for b, example in enumerate(examples):
            shown = example.prompt.candidate_items
            order = torch.argsort(scores[b, : len(shown)], descending=True, stable=True)
            out[b]["items"] = [(int(shown[j]), float(scores[b, j])) for j in order.tolist()]
            if query is not None:
                out[b]["query"] = query[b].float().cpu().tolist()
