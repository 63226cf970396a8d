"""Stage 2 training and evaluation pieces that know nothing of Ray or DeepSpeed.

What Stage 2 reads of the stages before it, and how a user becomes a prompt:
- x_u: the frozen CF backbone's user representation over the history the prompt shows;
- z_i: Stage 1's joint item embedding (`stage1/joint_item_emb.parquet`), by item id;
- a training example per user and epoch, as the reference: the last training item is the
  target, the items before it the history, and 19 negatives the user never interacted with
  join it as the 20 candidates, shuffled with a seed. `stage2.examples_per_user` gives more
  per user: the last k training items (`targets: last`) or k positions drawn afresh every
  epoch along the whole training sequence (`targets: sequence`), each with the items before it
  as the history and x_u over that history; negatives are drawn afresh every epoch;
- an evaluation example per user: the held-out item of the split with the evaluator's seeded
  19 negatives (`allmrec.evaluation.sample_candidates`, the very candidates every other model
  ranks), shuffled with a seed.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from allmrec.config import Config
from allmrec.data.prepared import PreparedData, load_prepared
from allmrec.evaluation import sample_candidates
from allmrec.manifest import ArtifactError
from allmrec.models.content import ContentTower, fit_content_tower
from allmrec.models.projection import ALLMRecLM, Stage2Example, right_aligned
from allmrec.models.readout import CountGate, TextInputs, history_lengths, text_cosine
from allmrec.prompts import build_prompt, shown_items, shuffle_candidates
from allmrec.sequences import left_pad
from allmrec.stages import output_digest, read_manifest, recorded_upstream

log = logging.getLogger(__name__)


@dataclass
class Stage2Inputs:
    """Everything a Stage 2 prompt needs of the data set, the CF backbone and Stage 1."""

    data: PreparedData
    cf_model: torch.nn.Module
    titles: list[str]  # by item id; index 0 is padding
    z: torch.Tensor  # [num_items + 1, d_joint] joint item embeddings, row 0 zeros
    z_source: np.ndarray  # "item" or "text" (cold items without interactions) by item id
    cold_items: np.ndarray  # bool by item id: the data's cold label (data.cold_item_share)
    cf_manifest: dict
    stage1_manifest: dict
    z_text: torch.Tensor | None = None  # [num_items + 1, d_joint] enc_T(q_i) of every item
    q: torch.Tensor | None = None  # [num_items + 1, d_text] Stage 1's Sentence-BERT q_i
    warm_items: np.ndarray | None = None  # bool by item id: the data's warm label
    # training interactions by item id when not the data's own (cross-domain: the stack's)
    item_counts: torch.Tensor | None = None
    matched_items: int | None = None  # cross-domain: items matched to the stack's catalogue

    @property
    def d_cf(self) -> int:
        return int(self.cf_model.item_embeddings().shape[1])

    @property
    def d_joint(self) -> int:
        return int(self.z.shape[1])

    @property
    def d_text(self) -> int | None:
        return None if self.q is None else int(self.q.shape[1])

    @property
    def counts(self) -> torch.Tensor:
        """Training interactions by item id (of the users that are trained on)."""
        if self.item_counts is not None:
            return self.item_counts
        return torch.as_tensor(self.data.item_train_counts, dtype=torch.long)


def item_titles(data: PreparedData, template: str) -> list[str]:
    """The prompt's name of every item from `template` over the item table's fields."""
    table = pq.read_table(data.directory / "items.parquet")
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = fields - set(table.column_names)
    if missing:
        raise ValueError(
            f"stage2.title_template {template!r}: no field {', '.join(sorted(missing))} in "
            f"{data.directory / 'items.parquet'} (fields: {', '.join(table.column_names)})"
        )
    titles = [""] * (data.num_items + 1)
    columns = {name: table.column(name).to_pylist() for name in fields | {"item_idx"}}
    for row, idx in enumerate(columns["item_idx"]):
        values = {name: columns[name][row] or "" for name in fields}
        titles[idx] = " ".join(template.format(**values).split())
    return titles


@dataclass
class JointEmbeddings:
    """`stage1/joint_item_emb.parquet` by item id (row 0, padding, zeros)."""

    z: torch.Tensor  # [num_items + 1, d_joint] the joint embedding z_i
    source: np.ndarray  # "item" or "text" (items without interactions) by item id
    z_text: torch.Tensor  # [num_items + 1, d_joint] enc_T(q_i) of every item
    q: torch.Tensor  # [num_items + 1, d_text] the Sentence-BERT encoding q_i


def load_joint_embeddings(run_dir: Path, num_items: int) -> JointEmbeddings:
    path = Path(run_dir) / "stage1" / "joint_item_emb.parquet"
    table = pq.read_table(path)
    missing = {"z", "source", "z_text", "q"} - set(table.column_names)
    if missing:
        raise ArtifactError(
            f"{path}: no column(s) {', '.join(sorted(missing))} (made by an older allmrec); "
            "rerun `allmrec train stage1`"
        )
    ids = table.column("item_idx").to_numpy()
    if len(ids) != num_items or ids.max(initial=0) > num_items:
        raise ArtifactError(
            f"{path}: {len(ids)} items, but the prepared data has {num_items}: Stage 1 was "
            "trained on another preparation; rerun `allmrec train stage1`"
        )
    rows = torch.tensor(ids, dtype=torch.long)

    def by_item(name: str) -> torch.Tensor:
        dim = table.schema.field(name).type.list_size
        values = table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, dim)
        out = torch.zeros(num_items + 1, dim)
        out[rows] = torch.tensor(values, dtype=torch.float32)
        return out

    source = np.full(num_items + 1, "", dtype=object)
    source[ids] = table.column("source").to_pylist()
    return JointEmbeddings(by_item("z"), source, by_item("z_text"), by_item("q"))


def load_stage2_inputs(run_dir: Path, config: Config) -> Stage2Inputs:
    """The data, the frozen CF backbone and Stage 1's z_i of `run_dir`, checked to belong
    together (Stage 1 must have been trained on this very CF model and data)."""
    from allmrec.training.cf import load_cf_model

    run_dir = Path(run_dir)
    data = load_prepared(run_dir)
    cf_model, cf_manifest = load_cf_model(run_dir, data)
    stage1_manifest = read_manifest(run_dir / "stage1", "stage1")
    if recorded_upstream(stage1_manifest, "cf") != cf_manifest["model_sha256"]:
        raise ArtifactError(
            f"{run_dir / 'stage1' / 'manifest.json'}: field 'inputs.upstream.cf' does not match "
            f"{run_dir / 'cf' / 'model.safetensors'}: the CF model changed after Stage 1; "
            "rerun `allmrec train stage1`"
        )
    if recorded_upstream(stage1_manifest, "data") != data.fingerprint:
        raise ArtifactError(
            f"{run_dir / 'stage1' / 'manifest.json'}: made from another data preparation; "
            "rerun `allmrec train stage1`"
        )
    joint = load_joint_embeddings(run_dir, data.num_items)
    cold, warm = item_sections(data)
    cf_model.eval()
    return Stage2Inputs(
        data,
        cf_model,
        item_titles(data, config.stage2.title_template),
        joint.z,
        joint.source,
        cold,
        cf_manifest,
        stage1_manifest,
        z_text=joint.z_text,
        q=joint.q,
        warm_items=warm,
    )


def item_sections(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """(cold, warm) masks by item id, the data's labels (`data.cold_item_share`)."""
    items = pq.read_table(
        data.directory / "items.parquet", columns=["item_idx", "is_cold", "is_warm"]
    )
    ids = items.column("item_idx").to_numpy()
    cold = np.zeros(data.num_items + 1, dtype=bool)
    warm = np.zeros(data.num_items + 1, dtype=bool)
    cold[ids] = items.column("is_cold").to_numpy(zero_copy_only=False)
    warm[ids] = items.column("is_warm").to_numpy(zero_copy_only=False)
    return cold, warm


@torch.no_grad()
def user_vectors_of(
    inputs: Stage2Inputs, users: np.ndarray, histories: list[np.ndarray]
) -> torch.Tensor:
    """x_u of the frozen CF backbone for `users` over `histories` (most recent last)."""
    model = inputs.cf_model
    seqs = torch.as_tensor(left_pad(histories, model.config.max_len))
    return model.user_representation(torch.as_tensor(users, dtype=torch.long), seqs).float()


def training_targets(
    users: np.ndarray, data: PreparedData, config: Config, epoch: int
) -> list[tuple[int, int]]:
    """(user, cut) pairs of one epoch: target `train[u][cut]`, history `train[u][:cut]`.

    Exactly `stage2.examples_per_user` pairs per user (workers must take equal numbers of
    steps): `last` takes the last ones (the first position repeats for a sequence shorter than
    that), `sequence` draws distinct positions with a generator seeded by (seed, epoch, user),
    so a user's targets do not depend on how the users are sharded.
    """
    cfg = config.stage2
    k = cfg.examples_per_user
    pairs = []
    for user in users:
        n = len(data.train[int(user)])
        if n < 2:
            raise ValueError(f"user {user}: {n} training item(s); Stage 2 needs at least 2")
        if cfg.targets == "last":
            cuts = np.maximum(n - 1 - np.arange(k), 1)
        else:
            rng = np.random.default_rng([config.seed, epoch, int(user)])
            cuts = rng.choice(np.arange(1, n), size=k, replace=n - 1 < k)
        pairs += [(int(user), int(cut)) for cut in cuts]
    return pairs


def training_examples(
    pairs: list[tuple[int, int]],
    inputs: Stage2Inputs,
    config: Config,
    rng: np.random.Generator,
    cold_weight: float = 1.0,
) -> list[Stage2Example]:
    """An example per (user, cut): history train[:cut], target train[cut] and 19 negatives the
    user never interacted with, shuffled; the target as a title (`generate`) or an item
    (`rank`, weighted `cold_weight` in the loss where the item is cold:
    `target_cold_weight`)."""
    cfg = config.stage2
    data = inputs.data
    users = np.array([u for u, _ in pairs], dtype=np.int64)
    histories = [data.train[u][:cut] for u, cut in pairs]
    targets = [int(data.train[u][cut]) for u, cut in pairs]
    all_items = np.arange(1, data.num_items + 1)
    negatives = [  # distinct, none the user interacted with
        rng.choice(np.setdiff1d(all_items, data.interacted(int(u))), cfg.num_negatives, False)
        for u in users
    ]
    x_u = user_vectors_of(inputs, users, histories)
    examples = []
    for row, target in enumerate(targets):
        candidates = [target, *(int(i) for i in negatives[row])]
        order = shuffle_candidates(candidates, int(rng.integers(2**31)))
        prompt = build_prompt(
            histories[row], order, inputs.titles, config.data.domain, cfg.max_history
        )
        if cfg.objective == "rank":
            examples.append(
                Stage2Example(
                    prompt,
                    x_u[row],
                    inputs.z,
                    target_item=target,
                    item_text=inputs.q,
                    item_counts=inputs.counts,
                    weight=cold_weight if inputs.cold_items[target] else 1.0,
                )
            )
        else:
            examples.append(Stage2Example(prompt, x_u[row], inputs.z, inputs.titles[target]))
    return examples


@dataclass
class EvalCase:
    """One user's evaluation: candidates[0] is the true item; the prompt shows them shuffled."""

    user: int
    candidates: np.ndarray  # [20], true item first (the evaluator's order)
    history: np.ndarray
    x_u: torch.Tensor
    shuffled: list[int]  # the candidates in prompt order


def eval_cases(
    users: np.ndarray, inputs: Stage2Inputs, split: str, num_negatives: int, seed: int
) -> list[EvalCase]:
    data = inputs.data
    candidates = sample_candidates(data, users, split, num_negatives, seed)
    histories = [data.history(int(u), split) for u in users]
    x_u = user_vectors_of(inputs, users, histories)
    return [
        EvalCase(
            int(u),
            candidates[row],
            histories[row],
            x_u[row],
            # seeded per (seed, user): the same prompt order for every model and run
            shuffle_candidates(candidates[row].tolist(), seed * 1_000_003 + int(u)),
        )
        for row, u in enumerate(users)
    ]


def eval_example(
    case: EvalCase,
    inputs: Stage2Inputs,
    config: Config,
    with_embeddings: bool = True,
    z: torch.Tensor | None = None,
) -> Stage2Example:
    """A case as a prompt; `z` replaces the joint embeddings (the SBERT row: enc_T(q_i))."""
    prompt = build_prompt(
        case.history,
        case.shuffled,
        inputs.titles,
        config.data.domain,
        config.stage2.max_history,
        with_embeddings=with_embeddings,
    )
    return Stage2Example(
        prompt,
        case.x_u,
        z if z is not None else inputs.z,
        item_text=inputs.q,
        item_counts=inputs.counts,
    )


def build_stage2_model(
    config: Config,
    d_cf: int,
    d_joint: int,
    llm=None,
    tokenizer=None,
    device: str = "cpu",
    d_text: int | None = None,
) -> ALLMRecLM:
    """The frozen LLM named by `stage2.llm` (with the special tokens) and fresh projectors
    (and, for the rank objective, a fresh readout and bypass)."""
    from allmrec.llm import add_special_tokens, load_llm

    cfg = config.stage2
    if llm is None:
        llm, tokenizer = load_llm(cfg.llm, dtype=llm_dtype(config))
    add_special_tokens(llm, tokenizer)
    model = ALLMRecLM(
        llm,
        tokenizer,
        d_cf,
        d_joint,
        objective=cfg.objective,
        readout=cfg.readout,
        readout_layer=cfg.readout_layer,
        readout_dim=cfg.readout_dim,
        bypass=cfg.bypass,
        d_text=d_text,
        text_options=text_options(config),
    )
    return model.to(device)


def text_options(config: Config, weights: dict[str, torch.Tensor] | None = None) -> dict:
    """The `user_item_text` readout's text path, as `RankReadout` takes it; with a saved
    stack's `weights`, the cosine path for a stack saved before the content path."""
    cfg = config.stage2
    options = {
        "text_path": cfg.text_path,
        "content_dim": cfg.content_dim,
        "content_window": cfg.content_window,
        "content_counts": cfg.content_counts,
    }
    if weights is not None:
        if "readout.content_scale" not in weights:
            options["text_path"] = "cosine"
        # a stack saved before the content path read counts has no such buffer: it does not
        options["content_counts"] = bool(weights.get("readout.content.count_buckets", 0))
    return options


def start_readouts(
    model: ALLMRecLM,
    inputs: Stage2Inputs,
    config: Config,
    users: np.ndarray | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """The `user_item` readouts at their starting point: the item map g fitted to the CF item
    embeddings (`RankReadout.fit_item_map`; the relative fit error of each) and, for
    `user_item_text`, the weights of the item and the text path by interaction count
    (`RankReadout.fit_gate`, before any LLM step: the LLM's corrections are zero there, so
    the readout's scores need no forward pass) fitted on one example per user
    (`stage2.gate_fit`, `gate_fit_users`), an example whose true item is cold weighted by
    `stage2.gate_cold_weight`, and one more per user of a short history (the first items
    of their sequence, `stage2.gate_short_histories`) for the gate's history-length
    weights. With `stage2.text_path: content` the content path is trained
    first (`fit_content_tower`, on every transition of the training users' sequences) and
    its scale set against the cosine's on the gate's examples (`progress(epoch, epochs,
    loss)` after each of its epochs), and with `gate_cold_weight: auto` the weight is chosen
    on the same examples (`choose_cold_weight`). The bypass starts from the same weights;
    with `stage2.gate_trainable` false neither gate trains after the fit."""
    out = {}
    item_embeddings = inputs.cf_model.item_embeddings().detach().float().cpu()
    readouts = {"rank": model.readout, "bypass": getattr(model.bypass, "readout", None)}
    for name, readout in readouts.items():
        if readout is not None and readout.scores_any_item:
            out[f"{name}_item_map_error"] = readout.fit_item_map(inputs.z, item_embeddings)
    if model.readout is not None and model.readout.reads_text:
        readout, cfg = model.readout, config.stage2
        users = gate_fit_users(inputs, config) if users is None else users
        if readout.text_path == "content":
            data = inputs.data
            sequences = [data.train[int(u)] for u in data.training_users()]
            out |= fit_content_tower(
                readout.content,
                inputs.q,
                sequences,
                cfg.content_epochs,
                cfg.content_lr,
                seed=config.seed,
                counts=inputs.counts,
                progress=progress,
            )
            readout.content_scale.fill_(1.0)
        examples = gate_fit_examples(readout, inputs, config, users)  # at sigma = 1
        if readout.text_path == "content":
            full = ~examples.short  # sigma matches the cosine's spread on full histories
            out["content_scale"] = readout.set_content_scale(
                examples.text[full], examples.cosine[full]
            )
            # the readout's scores from now on, for every example alike
            examples = examples._replace(text=examples.text / out["content_scale"])
        true = examples.candidates[:, 0]
        cold = torch.as_tensor(np.asarray(inputs.cold_items, dtype=bool))[true]
        warm = torch.as_tensor(np.asarray(inputs.warm_items, dtype=bool))[true]
        weight = cfg.gate_cold_weight
        if weight == "auto":
            weight, table = choose_cold_weight(
                readout, examples, cold, warm, cfg.gate_cold_weights, config.seed, cfg.gate_auto_z
            )
            out["gate_cold_weight_table"] = table
        out["gate_cold_weight"] = float(weight)
        out |= readout.fit_gate(
            examples.cf,
            examples.text,
            examples.counts,
            examples.history_len,
            example_weights(cold, examples.short, weight),
        )
        out["gate_fit_users"] = len(users)
        out["gate_fit_cold_users"] = int((cold & ~examples.short).sum())
        out["gate_fit_short_histories"] = int(examples.short.sum())
        gates = [model.readout.gate]
        if model.bypass is not None:
            model.bypass.readout.gate.load_state_dict(model.readout.gate.state_dict())
            gates.append(model.bypass.readout.gate)
            if readout.text_path == "content":
                bypass = model.bypass.readout
                bypass.content.load_state_dict(readout.content.state_dict())
                bypass.content_scale.copy_(readout.content_scale)
        for gate in gates:
            gate.requires_grad_(config.stage2.gate_trainable)
    return out


def top1_hits(scores: torch.Tensor) -> torch.Tensor:
    """Hit@1 per row of [E, C] scores whose true item is column 0 (a tie is a miss)."""
    return (scores[:, 1:] < scores[:, :1]).all(1)


def example_weights(cold: torch.Tensor, short: torch.Tensor, weight: float) -> torch.Tensor:
    """The gate fit's weight of each example: `weight` where its true item is cold, 1 for the
    others and for every short-history example (they fit the history's weights, not the
    trade between cold and warm items)."""
    return torch.where(cold & ~short, float(weight), 1.0)


def choose_cold_weight(
    readout,
    examples: GateExamples,
    cold: torch.Tensor,
    warm: torch.Tensor,
    grid: list[float],
    seed: int,
    z: float = 1.645,
) -> tuple[float, list[dict]]:
    """`stage2.gate_cold_weight: auto`: for each weight of `grid`, the gate fitted on one
    seeded half of the examples scores the other (both ways); the largest weight whose gain
    in Hit@1 over the CF path alone, paired by example, is above 0 over all (full-history)
    examples and above -0.01 over those of warm items, each less `z` standard errors (1.645:
    one-sided 95%), so that a weight is taken only where the examples show it keeps the
    bars, not where it ties them by chance; the one with the best Hit@1 over all if none is.
    Returns it and each weight's row (Hit@1 all / cold / warm / short histories, the paired
    gains' lower bounds). The gate is left as it was."""
    start = {k: v.clone() for k, v in readout.gate.state_dict().items()}
    count = len(examples.cf)
    half = torch.as_tensor(np.random.default_rng([seed, 13]).permutation(count)) < count // 2
    cf_hits = top1_hits(examples.cf)
    full = ~examples.short

    def row(hits: torch.Tensor) -> dict[str, float | None]:
        sections = {"all": full, "cold": cold & full, "warm": warm & full, "short": ~full}
        # None, not NaN, for a section without examples: the table goes to JSON manifests
        return {k: float(hits[m].float().mean()) if m.any() else None for k, m in sections.items()}

    def lower_bound(hits: torch.Tensor, mask: torch.Tensor) -> float | None:
        gain = (hits[mask].float() - cf_hits[mask].float()).double()
        if gain.numel() < 2:
            return None  # no bar can be shown on fewer than two examples
        return float(gain.mean() - z * gain.std() / gain.numel() ** 0.5)

    table = [{"weight": 0.0, "path": "cf"} | row(cf_hits)]
    for weight in sorted(grid):
        hits = torch.zeros(count, dtype=torch.bool)
        for fit_on in (half, ~half):
            scored = ~fit_on
            readout.gate.load_state_dict(start)
            part = examples.rows(fit_on)
            readout.fit_gate(
                part.cf,
                part.text,
                part.counts,
                part.history_len,
                example_weights(cold[fit_on], part.short, weight),
            )
            part = examples.rows(scored)
            with torch.no_grad():
                gated = readout.gated(part.cf, part.text, part.counts, part.history_len)
            hits[scored] = top1_hits(gated)
        bounds = {
            "all_gain_low": lower_bound(hits, full),
            "warm_gain_low": lower_bound(hits, warm & full),
            "short_gain_low": lower_bound(hits, ~full),
        }
        table.append({"weight": float(weight), "path": "gate"} | row(hits) | bounds)
    readout.gate.load_state_dict(start)
    # without warm examples the warm bar cannot be shown, and the all-users bar alone decides
    keeps = [
        r
        for r in table[1:]
        if r["all_gain_low"] is not None
        and r["all_gain_low"] > 0
        and (r["warm_gain_low"] is None or r["warm_gain_low"] > -0.01)
    ]
    # none keeps the bars: the best over all users (the text path still ranks cold items)
    chosen = keeps[-1] if keeps else max(table[1:], key=lambda r: r["all"] or 0.0)
    log.info("gate cold weight %g chosen on validation: %s", chosen["weight"], table)
    return chosen["weight"], table


def gate_fit_users(inputs: Stage2Inputs, config: Config) -> np.ndarray:
    """The users whose examples fit the text-aware readout's weights: with `stage2.gate_fit:
    valid`, every user trained on (their validation items); with `last`, likewise (their last
    training items). A gate that trains on with the LLM (`stage2.gate_trainable`) leaves out
    the users of Stage 2's validation curve (all of them fit it if fewer than 50 would be
    left), so that the curve does not favour its start. A frozen gate fits them too, since
    with few users trained on every example counts (few-shot: a 256-user run's gate fitted
    on 128 of them scored 0.4730 on the test users, on all 256 0.4817; docs/results.md).
    Every point of the curve then holds the same gate, fitted on those very items at the
    start: a bias towards keeping the start, which a later point must overcome to be kept
    (the start's level is the fit's own, a little above a held-out one)."""
    data = inputs.data
    if config.stage2.gate_fit == "last":
        return data.training_users()
    if not config.stage2.gate_trainable:
        return data.eval_users("valid")
    curve = set(validation_users(inputs, config).tolist())
    curve |= set(validation_cold_users(inputs, config).tolist())
    users = np.array([u for u in data.eval_users("valid") if u not in curve], dtype=np.int64)
    return users if len(users) >= 50 else data.eval_users("valid")


def validation_users(inputs: Stage2Inputs, config: Config) -> np.ndarray:
    """The seeded `stage2.validation_users` valid-split users of Stage 2's learning curve."""
    from allmrec.data.prepared import seeded_users

    return seeded_users(
        inputs.data.eval_users("valid"), config.stage2.validation_users, config.seed
    )


def validation_cold_users(inputs: Stage2Inputs, config: Config) -> np.ndarray:
    """The curve's cold-item users beyond its sample (`stage2.validation_cold_users`, the
    rank objective's text-aware readout's only: its gate weighs them): seeded valid-split
    users outside `validation_users` whose validation item is cold."""
    from allmrec.data.prepared import seeded_users

    cfg = config.stage2
    gated = cfg.objective == "rank" and cfg.readout == "user_item_text"
    if not gated or not cfg.validation_cold_users:
        return np.zeros(0, dtype=np.int64)
    users, cold = valid_item_cold(inputs)
    outside = users[cold & ~np.isin(users, validation_users(inputs, config))]
    return seeded_users(outside, config.stage2.validation_cold_users, config.seed + 1)


def valid_item_cold(inputs: Stage2Inputs) -> tuple[np.ndarray, np.ndarray]:
    """(the valid-split users, whether each one's validation item is cold)."""
    users = inputs.data.eval_users("valid")
    return users, np.asarray(inputs.cold_items, dtype=bool)[inputs.data.valid[users]]


def valid_cold_share(inputs: Stage2Inputs) -> float:
    """The share of the valid-split users whose validation item is cold."""
    _, cold = valid_item_cold(inputs)
    return float(cold.mean()) if len(cold) else 0.0


class GateExamples(NamedTuple):
    """The gate's examples at the readout's start, [E, C] each with the true item in column
    0 (`gate_examples`)."""

    cf: torch.Tensor  # <x_u, g(z_c)>
    text: torch.Tensor  # the readout's text path's scores
    cosine: torch.Tensor  # the cosine path's, cos(mean unit history q, q_c)
    counts: torch.Tensor  # the candidates' training interactions
    candidates: torch.Tensor
    history_len: torch.Tensor  # [E]: the prompt's history items
    short: torch.Tensor  # [E] bool: a short-history example (`stage2.gate_short_histories`)

    def rows(self, mask: torch.Tensor) -> GateExamples:
        return GateExamples(*(field[mask] for field in self))

    def joined(self, other: GateExamples) -> GateExamples:
        return GateExamples(*(torch.cat([a, b]) for a, b in zip(self, other, strict=True)))


def shown_history(
    vectors: torch.Tensor, counts: torch.Tensor, shown: list[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's history as the text readouts read it, from the item ids it shows:
    their `vectors` (q_j, by item id) [B, H, d] right-aligned, zero rows before a shorter
    history, and their `counts` (by item id) [B, H] aligned with them, zeros before."""
    history = right_aligned([vectors[torch.as_tensor(h, dtype=torch.long)] for h in shown])
    counts_of = counts.numpy()
    return history, torch.as_tensor(left_pad([counts_of[h] for h in shown], history.shape[1]))


@torch.no_grad()
def gate_examples(
    readout, inputs: Stage2Inputs, config: Config, users: np.ndarray, short: bool = False
) -> GateExamples:
    """One example per user, with 19 seeded negatives the user never interacted with. The
    target, by `stage2.gate_fit`: `valid`, the user's validation item after their training
    items (the CF model never trained on it: its scores are as reliable as at test time;
    in-sample targets, which it memorised, make it look surer than it is, most of all when
    it trained on few users); `last`, the user's last training item after the items before
    it, its count without its own interaction (so the bucket of items never seen learns from
    the items seen once). `short`: the user's first L training items (L seeded from
    `stage2.gate_short_histories`, fewer for a shorter sequence) before their next, its
    count likewise without its own interaction: the beginning of a sequence, as a cold user
    is seen (a long history cut short is not one: its last items are not a new user's
    first, and a gate fitted on those trusted the text more and cost ML-1M's cold users
    0.03-0.06 Hit@1, docs/results.md)."""
    data, cfg = inputs.data, config.stage2
    users = np.asarray(users, dtype=np.int64)
    rng = np.random.default_rng([config.seed, 17 if short else 11])
    all_items = np.arange(1, data.num_items + 1)
    in_sample = short or cfg.gate_fit == "last"
    if short:
        lengths = rng.choice(np.asarray(cfg.gate_short_histories), size=len(users))
        lengths = np.minimum(lengths, [len(data.train[int(u)]) - 1 for u in users])
        histories = [data.train[int(u)][:n] for u, n in zip(users, lengths, strict=True)]
        targets = [int(data.train[int(u)][n]) for u, n in zip(users, lengths, strict=True)]
    elif cfg.gate_fit == "valid":
        histories = [data.train[int(u)] for u in users]
        targets = [int(data.valid[int(u)]) for u in users]
    else:
        histories = [data.train[int(u)][:-1] for u in users]
        targets = [int(data.train[int(u)][-1]) for u in users]
    candidates = np.stack(
        [
            np.concatenate(
                [
                    [target],
                    rng.choice(
                        np.setdiff1d(all_items, data.interacted(int(u))), cfg.num_negatives, False
                    ),
                ]
            )
            for u, target in zip(users, targets, strict=True)
        ]
    )
    x_u = user_vectors_of(inputs, users, histories)
    shown = [shown_items(h, cfg.max_history) for h in histories]
    history_text, history_counts = shown_history(inputs.q, inputs.counts, shown)
    cand = torch.as_tensor(candidates)
    counts = inputs.counts[cand].clone()
    if in_sample:  # a training target's count holds this very interaction
        counts[:, 0] = (counts[:, 0] - 1).clamp_min(0)
    text = TextInputs(history_text, inputs.q[cand], counts, history_counts)
    query = readout.start_query(x_u, text)
    cf_scores, text_scores = readout.path_scores(query, inputs.z[cand], text)
    return GateExamples(
        cf_scores,
        text_scores,
        text_cosine(text.history, text.items),
        text.counts,
        cand,
        history_lengths(text.history),
        torch.full((len(users),), short),
    )


def gate_fit_examples(
    readout, inputs: Stage2Inputs, config: Config, users: np.ndarray, short: bool = True
) -> GateExamples:
    """The examples the gate is fitted on, all drawn at the readout's present scale: each
    user's (`gate_examples`) and, with `short` and `stage2.gate_short_histories`, one more
    of a short history each."""
    examples = gate_examples(readout, inputs, config, users)
    if short and config.stage2.gate_short_histories:
        examples = examples.joined(gate_examples(readout, inputs, config, users, short=True))
    return examples


def llm_dtype(config: Config) -> torch.dtype:
    dtype = config.stage2.dtype
    if dtype == "auto":
        return torch.bfloat16 if config.stage2.scaling.use_gpu else torch.float32
    return getattr(torch, dtype)


# Everything Stage 2 trains: F_U, F_I and, for the rank objective, the readout and the bypass.
TRAINED_MODULES = ("user_projector", "item_projector", "readout", "bypass")
PROJECTOR_PREFIXES = tuple(f"{name}." for name in TRAINED_MODULES)
# The run stages Stage 2 reads, and the whole stack that evaluation and serving read.
STAGE2_INPUTS = ("data", "cf", "stage1")
STACK = (*STAGE2_INPUTS, "stage2")
PROJECTORS_FILE = "projectors.safetensors"  # all that Stage 2 trains (never the LLM)


def projector_state(model: ALLMRecLM) -> dict[str, torch.Tensor]:
    """What Stage 2 trained: the whole state of an ALLMRecLM (never the LLM)."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(PROJECTOR_PREFIXES)
    }


def load_projectors(model: ALLMRecLM, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = set(projector_state(model))
    got = set(weights)
    if got != expected:
        raise ArtifactError(
            f"{source}: projector weights do not fit this model: missing "
            f"{sorted(expected - got)[:4]}, unexpected {sorted(got - expected)[:4]} "
            "(another LLM or CF backbone?)"
        )
    for key, value in weights.items():
        target = model.state_dict()[key]
        if target.shape != value.shape:
            raise ArtifactError(
                f"{source}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(target.shape)} (another LLM or CF backbone?)"
            )
    model.load_state_dict(weights, strict=False)


def load_trained_stage2(run_dir: Path, device: str = "cpu", inputs_dir: Path | None = None):
    """(ALLMRecLM with the trained projectors of `run_dir/stage2`, Stage2Inputs) for evaluation
    and serving. The LLM, domain and titles are those Stage 2 was trained with (its manifest's
    config). `inputs_dir`: another run directory whose data, CF model and Stage 1 feed the
    projectors (cross-domain); by default `run_dir`'s own, which must be the ones trained on."""
    run_dir = Path(run_dir)
    stage2_dir = run_dir / "stage2"
    manifest = read_manifest(stage2_dir, "stage2")
    trained = _trained_config(manifest, device)
    inputs = load_stage2_inputs(Path(inputs_dir or run_dir), trained)
    if inputs_dir is None and recorded_upstream(manifest, "stage1") != output_digest(
        "stage1", run_dir
    ):
        raise ArtifactError(
            f"{stage2_dir / 'manifest.json'}: Stage 1 changed after Stage 2 was trained; "
            "rerun `allmrec train stage2`"
        )
    model, _ = load_projected_llm(run_dir, device)
    sized = (model.user_projector.net[0].in_features, model.item_projector.net[0].in_features)
    if sized != (inputs.d_cf, inputs.d_joint):
        raise ArtifactError(
            f"{stage2_dir}: projectors take (x_u, z_i) of sizes {sized}, but the inputs in "
            f"{inputs_dir or run_dir} give {(inputs.d_cf, inputs.d_joint)} "
            "(another CF backbone or Stage 1?)"
        )
    return model, inputs


def keep_score(point: dict, min_delta: float = 0.0) -> float:
    """What `stage2.keep: best` ranks a validation point by: its Hit@1 (`kept_metric`), less
    `min_delta` for a point after steps, less a hair per trained prompt (equal scores go to
    the earlier point)."""
    trained = point["prompts"] > 0
    return kept_metric(point) - min_delta * trained - 1e-12 * point["prompts"]


def kept_metric(point: dict) -> float | None:
    """The validation Hit@1 that `stage2.keep: best` compares: the text-aware readout's with
    each user of a cold item weighted as the gate's fit weighted them (`WEIGHTED_HIT`: the
    trade its cold weight was chosen for; Stage 2's steps train on mostly popular items, and
    a point they took from 1.58x to 1.28x SASRec on ML-1M's cold items was kept over all
    users alike; weighted over the 12 cold-item users of a 200-user sample it was kept too,
    hence `validation_cold_users` and `validation_weights`), else the readout's (rank
    objective) or the likelihood ranking's (generate objective)."""
    key = kept_key(point)
    return None if key is None else point[key]


WEIGHTED_HIT = "valid_weighted_hit@1"


def kept_key(point: dict, weighted: bool = True) -> str | None:
    """The key of `kept_metric` in a validation point (`weighted` False: the Hit@1 over every
    user alike, the readout's or the likelihood ranking's)."""
    keys = (WEIGHTED_HIT,) * weighted + ("valid_hit@1", "valid_likelihood_hit@1")
    return next((key for key in keys if key in point), None)


class ValidationWeights(NamedTuple):
    """Each validation case's weight in the curve's metrics (`validation_weights`)."""

    sample: np.ndarray  # `valid_hit@1`: 1 for the seeded sample's cases, 0 for the others
    cold: np.ndarray  # `valid_cold_hit@1`: 1 where the true item is cold
    weighted: np.ndarray | None  # `WEIGHTED_HIT`'s, None without a gate


def validation_weights(
    cases, sampled: int, inputs: Stage2Inputs, readout_start: dict
) -> ValidationWeights:
    """The weights of `cases`, the first `sampled` of them the seeded sample
    (`validation_users`), the rest cold-item users beyond it (`validation_cold_users`).

    `WEIGHTED_HIT` estimates the Hit@1 of all valid-split users with each cold-item user
    weighted w, the gate's cold weight (`readout_start["gate_cold_weight"]`): the sample's
    other users at their share 1 - p of the valid-split users, every cold-item case
    (sample's and beyond) at w p, p the share with a cold item (`valid_cold_share`)."""
    cold_items = np.asarray(inputs.cold_items, dtype=bool)
    cold = np.array([cold_items[int(c.candidates[0])] for c in cases], dtype=float)
    sample = (np.arange(len(cases)) < sampled).astype(float)
    if "gate_cold_weight" not in readout_start:
        return ValidationWeights(sample, cold, None)
    w, p = float(readout_start["gate_cold_weight"]), valid_cold_share(inputs)
    others = sample * (1 - cold)
    weighted = np.zeros(len(cases))
    if others.sum():
        weighted += others * (1 - p) / others.sum()
    if cold.sum():
        weighted += cold * w * p / cold.sum()
    return ValidationWeights(sample, cold, weighted)


def target_cold_weight(config: Config, readout_start: dict) -> float:
    """A cold training target's weight in the rank loss (`stage2.cold_target_weight`; 'gate':
    the gate's cold weight, 1 for a readout without a gate)."""
    weight = config.stage2.cold_target_weight
    if weight == "gate":
        return float(readout_start.get("gate_cold_weight", 1.0))
    return float(weight)


def _trained_config(manifest: dict, device: str) -> Config:
    trained = Config.model_validate(manifest["config"])
    if trained.stage2.scaling.use_gpu and device == "cpu":
        trained.stage2.dtype = "float32"  # trained on GPUs in bf16, evaluated on a CPU
    return trained


def load_projected_llm(
    run_dir: Path, device: str = "cpu", dtype: str | None = None
) -> tuple[ALLMRecLM, Config]:
    """The frozen LLM of `run_dir/stage2` with its trained projectors, and the config Stage 2
    was trained with; sized from the projector weights, without loading the data. `dtype`
    ("float32", "bfloat16") runs the LLM in another dtype than it was trained in (the
    projectors and the readout stay fp32)."""
    stage2_dir = Path(run_dir) / "stage2"
    trained = _trained_config(read_manifest(stage2_dir, "stage2"), device)
    if dtype is not None:
        trained.stage2.dtype = dtype
    weights = load_stack_weights(stage2_dir)
    d_cf = weights["user_projector.net.0.weight"].shape[1]
    d_joint = weights["item_projector.net.0.weight"].shape[1]
    d_text = text_width(weights)
    trained.stage2.text_path = text_options(trained, weights)["text_path"]
    model = build_stage2_model(trained, d_cf, d_joint, device=device, d_text=d_text)
    load_projectors(model, weights, str(stage2_dir))
    return model.eval(), trained


def load_stack_weights(stage2_dir: Path) -> dict[str, torch.Tensor]:
    """Stage 2's saved weights; a gate saved before its history-length weights gets them at
    their start (`CountGate.completed`), a content path saved before it could read counts
    says it reads none (`ContentTower.completed`): each scores as it did."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(stage2_dir) / PROJECTORS_FILE))
    for prefix in ("readout.", "bypass.readout."):
        weights = CountGate.completed(weights, f"{prefix}gate.")
        weights = ContentTower.completed(weights, f"{prefix}content.")
    return weights


def text_width(weights: dict[str, torch.Tensor]) -> int | None:
    """d_text, the width of q_i, of a `user_item_text` readout's weights (None: another)."""
    content = weights.get("readout.content.item_tower.0.weight")
    if content is not None:  # q_i and, where the tower reads them, the count buckets
        return content.shape[1] - int(weights.get("readout.content.count_buckets", 0))
    text_head = weights.get("readout.text_head.1.weight")
    return None if text_head is None else text_head.shape[0]
