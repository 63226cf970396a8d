"""Ray Data: raw interaction logs and item texts -> prepared Parquet splits + text embeddings.

The interaction log is read in blocks by a datasource over the library's streaming readers
(one read task per file, many blocks per file), filtered, remapped and split with Ray Data
operations; item texts are embedded by an actor pool. Everything is written into a staging
directory that becomes `<run>/data/` only when every step succeeded, manifest last.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from allmrec.config import Config, DataConfig, config_to_dict
from allmrec.data import prepare
from allmrec.data.readers import (
    BadLine,
    iter_interaction_batches,
    read_items,
    readable_from_every_node,
)
from allmrec.data.schema import ITEMS_SCHEMA, USERS_SCHEMA, item_text_emb_schema
from allmrec.data.sources import ResolvedSource, resolve_source
from allmrec.manifest import staged_output, tree_sha256, write_manifest
from allmrec.stages import stage_inputs
from allmrec.storage import RunStorage, open_run
from allmrec.text_encoder import ItemTextEmbedder

log = logging.getLogger(__name__)

# What a read task yields: the raw schema plus where each row came from, and for a
# malformed line its description (the row's other fields are then placeholders).
READ_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
        ("source_line", pa.int64()),
        ("file_index", pa.int32()),
        ("error", pa.string()),
    ]
)


class DataPreparationError(ValueError):
    """The source cannot be prepared as configured (bad lines, nothing left, ...)."""


def _read_block(table: pa.Table, bad: list[BadLine], file_index: int) -> pa.Table:
    good = table.select(["user_id", "item_id", "timestamp", "rating", "source_line"])
    good = good.append_column("file_index", pa.array(np.full(good.num_rows, file_index, np.int32)))
    good = good.append_column("error", pa.nulls(good.num_rows, pa.string()))
    if not bad:
        return good.cast(READ_SCHEMA)
    bad_rows = pa.table(
        {
            "user_id": [""] * len(bad),
            "item_id": [""] * len(bad),
            "timestamp": [0] * len(bad),
            "rating": pa.nulls(len(bad), pa.float32()),
            "source_line": [b.line_no for b in bad],
            "file_index": [file_index] * len(bad),
            "error": [b.describe() for b in bad],
        },
        schema=READ_SCHEMA,
    )
    return pa.concat_tables([good.cast(READ_SCHEMA), bad_rows])


class InteractionLogDatasource(Datasource):
    """Interaction files of one format, read by the library's streaming line readers."""

    def __init__(self, paths: list[str], fmt: str, batch_rows: int) -> None:
        super().__init__()
        self.paths, self.fmt, self.batch_rows = paths, fmt, batch_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for index, path in enumerate(self.paths):

            def read(path: str = path, index: int = index):
                for table, bad in iter_interaction_batches(path, self.fmt, self.batch_rows):
                    yield _read_block(table, bad, index)

            meta = BlockMetadata(
                num_rows=None, size_bytes=None, exec_stats=None, input_files=[path]
            )
            tasks.append(ReadTask(read, meta, schema=READ_SCHEMA))
        return tasks


def _only_bad(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t.column("error"))).select(["error"])


def _only_good(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t.column("error"))).drop_columns(["error"])


def _block_counts(t: pa.Table) -> pa.Table:
    parts = []
    for column in ("user_id", "item_id"):
        counts = t.group_by(column).aggregate([([], "count_all")])
        parts.append(
            pa.table(
                {
                    "kind": pa.array([column] * counts.num_rows, pa.string()),
                    "key": counts.column(column),
                    "n": counts.column("count_all"),
                }
            )
        )
    return pa.concat_tables(parts)


def _counts(ds: ray.data.Dataset) -> tuple[dict[str, int], dict[str, int]]:
    """Interactions per user and per item: counted per block, summed on the driver.

    Partial counts are tiny next to the data, so this is one pass with no shuffle (a
    groupby().count() shuffles the whole log, several times slower on a small cluster).
    """
    partial_counts = pa.concat_tables(
        ray.get(ds.map_batches(_block_counts, batch_format="pyarrow").to_arrow_refs())
    )
    totals = partial_counts.group_by(["kind", "key"]).aggregate([("n", "sum")])
    out: dict[str, dict[str, int]] = {"user_id": {}, "item_id": {}}
    for kind, key, n in zip(
        totals.column("kind").to_pylist(),
        totals.column("key").to_pylist(),
        totals.column("n_sum").to_pylist(),
        strict=True,
    ):
        out[kind][key] = n
    return out["user_id"], out["item_id"]


def _keep_users_and_items(t: pa.Table, users: pa.Array, items: pa.Array) -> pa.Table:
    return prepare.keep_ids(prepare.keep_ids(t, "user_id", users), "item_id", items)


def _shuffle_partitions() -> int:
    # Ray's default of 200 hash partitions costs ~10 s of overhead per shuffle on 2 CPUs.
    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def _kcore(ds: ray.data.Dataset, cfg: DataConfig, counts_log: list[dict]) -> ray.data.Dataset:
    """Keep users and items with enough interactions: once, or repeated to a k-core."""
    while True:
        users, items = _counts(ds)
        keep_users = prepare.passing_ids(users, cfg.min_user_interactions)
        keep_items = prepare.passing_ids(items, cfg.min_item_interactions)
        counts_log.append(
            {
                "users": len(users),
                "items": len(items),
                "interactions": int(sum(users.values())),
                "users_kept": len(keep_users),
                "items_kept": len(keep_items),
            }
        )
        if not keep_users or not keep_items:
            raise DataPreparationError(
                f"no interactions left after keeping users with >= {cfg.min_user_interactions}"
                f" and items with >= {cfg.min_item_interactions} interactions "
                f"(data.min_user_interactions / data.min_item_interactions; before this round: "
                f"{len(users)} users, {len(items)} items)"
            )
        if len(keep_users) == len(users) and len(keep_items) == len(items):
            return ds
        user_set, item_set = pa.array(keep_users, pa.string()), pa.array(keep_items, pa.string())
        ds = ds.map_batches(
            partial(_keep_users_and_items, users=user_set, items=item_set),
            batch_format="pyarrow",
        ).materialize()
        if not cfg.iterative_kcore:
            return ds


def _fingerprint(table: pa.Table, users: pa.Table) -> str:
    """A content hash of the prepared interactions and of who trains on them (the users'
    roles), independent of file layout: a stage trained on other users refuses this data."""
    digest = hashlib.sha256()
    for name in ("user_idx", "item_idx", "position", "timestamp"):
        digest.update(table.column(name).to_numpy().tobytes())
    digest.update("\n".join(table.column("split").to_pylist()).encode())
    digest.update("\n".join(users.column("role").to_pylist()).encode())
    return digest.hexdigest()


def _items_table(
    source: ResolvedSource,
    item_order: list[str],
    train_counts: np.ndarray,
    cfg: DataConfig,
    bad_lines: list[BadLine],
) -> tuple[pa.Table, int, dict]:
    meta: dict[str, dict] = {}
    extra_columns: list[str] = []
    for path in source.item_paths:
        table, bad = read_items(path, source.format)
        bad_lines.extend(bad)
        extra_columns += [c for c in table.column_names[3:] if c not in extra_columns]
        for row in table.to_pylist():
            meta.setdefault(row["item_id"], row)
    titles, descriptions, texts, missing = [], [], [], 0
    extras: dict[str, list] = {c: [] for c in extra_columns}
    for raw_id in item_order:
        row = meta.get(raw_id)
        if row is None:
            missing += 1
            row = {"item_id": raw_id}
        fields = {c: row.get(c) for c in ["title", "description", *extra_columns]}
        text = prepare.item_text(fields, cfg.text_template)
        titles.append(row.get("title") or "No Title")
        descriptions.append(row.get("description") or "No Description")
        texts.append(text)
        for c in extra_columns:
            extras[c].append(None if row.get(c) is None else str(row.get(c)))
    n = len(item_order)
    cold, warm, sections = prepare.popularity_sections(
        train_counts[1:], cfg.cold_item_share, cfg.cold_item_threshold
    )
    table = pa.table(
        {
            "item_idx": pa.array(np.arange(1, n + 1, dtype=np.int32)),
            "item_id": item_order,
            "title": titles,
            "description": descriptions,
            "text": texts,
            "num_train": pa.array(train_counts[1:].astype(np.int32)),
            "is_cold": pa.array(cold),
            "is_warm": pa.array(warm),
        },
        schema=ITEMS_SCHEMA,
    )
    for c in extra_columns:
        table = table.append_column(pa.field(c, pa.string()), pa.array(extras[c], pa.string()))
    return table, missing, sections


def _embed_items(items: pa.Table, cfg: DataConfig) -> tuple[pa.Table, int]:
    ds = ray.data.from_arrow(items.select(["item_idx", "text"])).repartition(
        max(1, cfg.embed_actors * 2)
    )
    embedded = ds.map_batches(
        ItemTextEmbedder,
        fn_constructor_kwargs={"encoder": cfg.text_encoder, "batch_size": cfg.text_batch_size},
        compute=ActorPoolStrategy(size=cfg.embed_actors),
        # Below one CPU: on 2 cores, actors holding every CPU starve the other tasks.
        num_cpus=cfg.embed_actor_cpus,
        batch_size=cfg.text_batch_size * 4,
        batch_format="numpy",
    )
    ids, embs = [], []
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["item_idx"])
        embs.append(np.asarray(batch["embedding"], dtype=np.float32))
    order = np.argsort(np.concatenate(ids))
    emb = np.concatenate(embs)[order]
    dim = emb.shape[1]
    flat = pa.array(emb.reshape(-1), pa.float32())
    return (
        pa.table(
            {
                "item_idx": pa.array(np.concatenate(ids)[order].astype(np.int32)),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            },
            schema=item_text_emb_schema(dim),
        ),
        dim,
    )


def _raise_on_bad_lines(bad: list[str], total: int, limit: int, what: str) -> None:
    if total > limit:
        shown = "\n  ".join(bad[:5])
        raise DataPreparationError(
            f"{total} malformed {what} line(s), more than data.max_bad_lines={limit} "
            f"(use --max-bad-lines N or --set data.max_bad_lines=N to tolerate them):\n  {shown}"
        )


def _this_node() -> str:
    """The driver's node. Writing tasks stay on it, and so do the reads of source files on its
    disk (fetched there): nothing assumes that another node sees this disk (the finished
    stage then goes to the run's storage)."""
    return ray.get_runtime_context().get_node_id()


def _read_placement(paths: list[str]) -> dict:
    """Sources in a shared store (s3://, gs://, ...) are read on any node; local files on the
    driver's."""
    if readable_from_every_node(paths):
        return {}
    return {"label_selector": {"ray.io/node-id": _this_node()}}


@dataclass
class _Interactions:
    """What reading the source left: its good rows and the bad lines found."""

    good: ray.data.Dataset
    rows: int
    bad_total: int
    bad_shown: list[str]  # at most 100, each naming its file and line


def _read_interactions(source: ResolvedSource, cfg: DataConfig) -> _Interactions:
    """The source's interaction lines as a Ray Dataset; too many bad lines is an error."""
    raw = ray.data.read_datasource(
        InteractionLogDatasource(source.interaction_paths, source.format, cfg.read_batch_rows),
        # Ray's default splits the output into 200 blocks; on a small cluster each later pass
        # then schedules 200 tiny tasks. A few blocks per CPU is plenty.
        override_num_blocks=max(len(source.interaction_paths), 2 * _shuffle_partitions()),
        **_read_placement(source.interaction_paths),
    ).materialize()
    bad_ds = raw.map_batches(_only_bad, batch_format="pyarrow").materialize()
    bad_total = bad_ds.count()
    bad_shown = [r["error"] for r in bad_ds.take(100)] if bad_total else []
    _raise_on_bad_lines(bad_shown, bad_total, cfg.max_bad_lines, "interaction")

    # materialized: counted here and shuffled next, read once
    good = raw.map_batches(_only_good, batch_format="pyarrow").materialize()
    rows = good.count()
    if rows == 0:
        raise DataPreparationError(
            f"no interactions could be read from {', '.join(source.interaction_paths)}"
        )
    return _Interactions(good, rows, bad_total, bad_shown)


def _filter_and_split(
    good: ray.data.Dataset, source: ResolvedSource, cfg: DataConfig, filter_rounds: list[dict]
) -> tuple[ray.data.Dataset, list, list]:
    """Each user's interactions sorted (ties by source order) and deduplicated, the k-core
    filter (its rounds appended to `filter_rounds`), contiguous ids, and the leave-one-out
    split: (the split Dataset, user ids in id order, item ids in id order)."""
    sorted_users = (
        good.groupby("user_id", num_partitions=_shuffle_partitions())
        .map_groups(partial(prepare.sort_user_group, dedupe=cfg.dedupe), batch_format="pyarrow")
        .materialize()
    )
    filtered = _kcore(sorted_users, cfg, filter_rounds)
    users_left, items_left = _counts(filtered)
    if not users_left:  # the one-pass filter removed items, and with them whole users
        raise DataPreparationError(
            f"{source.name}: no interactions left after filtering (data.min_user_interactions"
            f"={cfg.min_user_interactions}, data.min_item_interactions="
            f"{cfg.min_item_interactions})"
        )
    user_order = prepare.contiguous_ids(list(users_left))
    item_order = prepare.contiguous_ids(list(items_left))
    user_arr, item_arr = pa.array(user_order), pa.array(item_order)
    split = (
        filtered.map_batches(
            lambda t: prepare.remap_block(t, user_arr, item_arr), batch_format="pyarrow"
        )
        .groupby("user_idx", num_partitions=_shuffle_partitions())
        .map_groups(prepare.split_user_group, batch_format="pyarrow")
    )
    return split, user_order, item_order


def _write_interactions(split: ray.data.Dataset, out: Path) -> pa.Table:
    """The split as Parquet on this node's staging directory, read back in (user, position)
    order."""
    split.write_parquet(
        str(out / "interactions"),
        ray_remote_args={
            "scheduling_strategy": NodeAffinitySchedulingStrategy(_this_node(), soft=False)
        },
    )
    return pq.read_table(out / "interactions").sort_by(
        [("user_idx", "ascending"), ("position", "ascending")]
    )


def _users_table(user_order: list, user_train: np.ndarray, roles: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "user_idx": pa.array(np.arange(1, len(user_order) + 1, dtype=np.int32)),
            "user_id": user_order,
            "num_train": pa.array(user_train[1:].astype(np.int32)),
            "role": pa.array(roles[1:].tolist(), pa.string()),
        },
        schema=USERS_SCHEMA,
    )


def _counts_of(
    read: _Interactions,
    filter_rounds: list[dict],
    interactions: pa.Table,
    items: pa.Table,
    users: pa.Table,
    items_without_meta: int,
    bad_item_lines: list[BadLine],
) -> dict:
    """The manifest's counts: raw, after filtering, per split, cold / warm items, users by
    role, bad lines."""
    roles, role_counts = np.unique(
        users.column("role").to_numpy(zero_copy_only=False), return_counts=True
    )
    splits, counts = np.unique(
        interactions.column("split").to_numpy(zero_copy_only=False), return_counts=True
    )
    return {
        "raw": {
            "users": filter_rounds[0]["users"],
            "items": filter_rounds[0]["items"],
            "interactions": int(read.rows),
            "interactions_after_dedupe": filter_rounds[0]["interactions"],
        },
        "users": users.num_rows,
        "items": items.num_rows,
        "interactions": interactions.num_rows,
        "splits": {s: int(n) for s, n in zip(splits, counts, strict=True)},
        "cold_items": int(pc.sum(items.column("is_cold")).as_py()),
        "warm_items": int(pc.sum(items.column("is_warm")).as_py()),
        "users_by_role": {r: int(n) for r, n in zip(roles, role_counts, strict=True)},
        "items_without_metadata": items_without_meta,
        "bad_lines": {"interactions": read.bad_total, "items": len(bad_item_lines)},
    }


def _preprocessing(cfg: DataConfig, filter_rounds: list[dict]) -> dict:
    return {
        "dedupe": "first interaction of each (user, item) kept" if cfg.dedupe else "none",
        "filter": f"users >= {cfg.min_user_interactions}, items >= "
        f"{cfg.min_item_interactions} interactions"
        + (" (iterative k-core)" if cfg.iterative_kcore else " (one pass)"),
        "filter_rounds": filter_rounds,
        "tie_break": prepare.TIE_BREAK,
        "split": "leave-one-out by time: last = test, second-to-last = valid",
        "ids": "contiguous from 1; 0 is padding",
        "users": f"a seeded {cfg.cold_user_share:.0%} of the users held out of every training "
        "stage (role 'cold', evaluated on their third interaction)"
        + (
            f"; {cfg.few_shot_users} seeded users of the others trained on (role 'train'), "
            "the rest only evaluated (role 'unseen')"
            if cfg.few_shot_users is not None
            else "; every other user trained on (role 'train')"
        ),
    }


def prepare_data(config: Config, run_dir: str | Path | RunStorage) -> dict:
    """Read, filter, split and embed the configured source into the run's `data/`."""
    run = open_run(run_dir)
    cfg = config.data
    started = time.perf_counter()
    source = resolve_source(cfg)
    log.info("preparing %s (%s): %s", source.name, source.format, source.interaction_paths)
    read = _read_interactions(source, cfg)
    filter_rounds: list[dict] = []
    split, user_order, item_order = _filter_and_split(read.good, source, cfg, filter_rounds)

    with staged_output(run.local / "data") as out:
        interactions = _write_interactions(split, out)
        n_users = len(user_order) + 1
        per_user = np.bincount(interactions.column("user_idx").to_numpy(), minlength=n_users)
        roles = prepare.user_roles(per_user, cfg.cold_user_share, cfg.few_shot_users, config.seed)
        train = interactions.filter(pc.equal(interactions.column("split"), "train"))
        train_users = train.column("user_idx").to_numpy()
        user_train = np.bincount(train_users, minlength=n_users)
        # items count the interactions of the users that are trained on only
        trained = train.filter(pa.array(roles[train_users] == prepare.ROLE_TRAIN))
        item_train = np.bincount(
            trained.column("item_idx").to_numpy(), minlength=len(item_order) + 1
        )

        bad_item_lines: list[BadLine] = []
        items, items_without_meta, sections = _items_table(
            source, item_order, item_train, cfg, bad_item_lines
        )
        _raise_on_bad_lines(
            [b.describe() for b in bad_item_lines], len(bad_item_lines), cfg.max_bad_lines, "item"
        )
        pq.write_table(items, out / "items.parquet")
        users = _users_table(user_order, user_train, roles)
        pq.write_table(users, out / "users.parquet")

        log.info("embedding %d item texts with %s", items.num_rows, cfg.text_encoder)
        embeddings, dim = _embed_items(items, cfg)
        pq.write_table(embeddings, out / "item_text_emb.parquet")

        manifest = write_manifest(
            out,
            "data",
            config=config_to_dict(config),
            inputs=stage_inputs("data", config, out),
            source={
                "name": source.name,
                "format": source.format,
                "interactions": source.interaction_paths,
                "items": source.item_paths,
                "sha256": source.hashes,
            },
            expected_raw=source.expected_raw,
            preprocessing=_preprocessing(cfg, filter_rounds),
            item_sections=sections,
            counts=_counts_of(
                read, filter_rounds, interactions, items, users, items_without_meta, bad_item_lines
            ),
            bad_lines=read.bad_shown + [b.describe() for b in bad_item_lines[:100]],
            text_encoder={"name": cfg.text_encoder, "dim": dim},
            fingerprint=_fingerprint(interactions, users),
            outputs=tree_sha256(out),
            seconds=round(time.perf_counter() - started, 2),
        )
    run.push("data")
    return manifest
