"""Ray Data vs one pandas process: preparing MovieLens for A-LLMRec, timed end to end.

What it measures. The same data preparation, on the same source and config, done two ways
in one run:

1. `allmrec.distributed.data_pipeline.prepare_data` on a local Ray started with `init_ray`
   (the library pipeline: a datasource over the streaming readers, a hash shuffle by user,
   a counting pass for the filter, a second shuffle for the split, and an actor pool that
   embeds the item texts). Only `prepare_data` is timed; Ray's start-up (init_ray plus one
   task round trip, so the pre-started workers are up) is reported separately.
2. The same steps in plain pandas/numpy in this process: the library reader
   (`iter_interaction_batches`), a stable per-user time sort on (timestamp, file index,
   source line), dedupe of (user, item) keeping the first, the one-pass (or k-core) filter,
   contiguous ids (`prepare.contiguous_ids`), position and leave-one-out split by groupby
   cumcount, item texts (`prepare.item_text`) and the same Sentence-BERT embedding
   (`ItemTextEmbedder`, same encoder and batch size), written to Parquet.

Both include reading the source (the wheel's sha256 check too) and embedding every item
text. The outputs are then compared: counts, per-split counts, the (user_idx, item_idx,
position, split) content, the item texts and the embeddings.

Why a 2-core single machine favours the single process. MovieLens-1M is 1M rows, ~25 MB in
memory: pandas sorts and groups it in about a second. Ray Data pays fixed costs that only
pay back when the data or the compute does not fit one machine: every operator is scheduled
as tasks, blocks are serialised through the object store, each groupby is an all-to-all
hash shuffle between processes, the counting pass is a separate job, and the text encoder
is loaded in a fresh actor process (whose torch, on a fraction of a CPU, gets one thread).
On two cores there is no parallelism to win back those costs, and Ray's own processes
(raylet, GCS, workers) compete with the work for the same two cores. Ray's value is the
cluster: the same code reads an Amazon category of tens of GB across many nodes and embeds
its millions of item texts on a pool of GPU actors, which no single process can.

Run (from the repository root; ML-1M takes ~5 min on 2 cores, ML-100K is a quick check):

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_pipeline.py
    .venv/bin/python benchmarks/data_pipeline.py --config configs/ml-100k-cpu.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray._private.services import find_bootstrap_address
from ray.data import DataContext

from allmrec.config import Config, DataConfig, load_config
from allmrec.data import prepare
from allmrec.data.readers import iter_interaction_batches, read_items
from allmrec.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, item_text_emb_schema
from allmrec.data.sources import ResolvedSource, resolve_source
from allmrec.distributed.data_pipeline import prepare_data
from allmrec.distributed.runtime import init_ray
from allmrec.text_encoder import ItemTextEmbedder

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LOGGER = "allmrec.distributed.data_pipeline"
SPLIT_NAMES = np.array(["train", "valid", "test"], dtype=object)

log = logging.getLogger("benchmark")


# --------------------------------------------------------------------------------------------
# The single-process version


@dataclass
class PandasResult:
    interactions: pd.DataFrame  # user_idx, item_idx, timestamp, rating, position, split
    items: pa.Table
    embeddings: np.ndarray  # row k is item_idx k + 1
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def without_embedding(self) -> float:
        return self.total - sum(v for k, v in self.seconds.items() if k.startswith("embed"))


class _Laps:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def _read_interactions(source: ResolvedSource, cfg: DataConfig) -> pd.DataFrame:
    frames, bad = [], 0
    for file_index, path in enumerate(source.interaction_paths):
        for table, bad_lines in iter_interaction_batches(path, source.format, cfg.read_batch_rows):
            bad += len(bad_lines)
            if table.num_rows:
                frame = table.to_pandas()
                frame["file_index"] = np.int32(file_index)
                frames.append(frame)
    if bad > cfg.max_bad_lines:
        raise ValueError(f"{bad} malformed interaction lines > data.max_bad_lines")
    return pd.concat(frames, ignore_index=True)


def _filter(ucode: np.ndarray, icode: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Row mask of the users >= k / items >= k filter: one pass, or repeated (k-core)."""
    keep = np.ones(len(ucode), dtype=bool)
    n_users, n_items = int(ucode.max()) + 1, int(icode.max()) + 1
    while True:
        users = np.bincount(ucode[keep], minlength=n_users)
        items = np.bincount(icode[keep], minlength=n_items)
        ok_u = users >= cfg.min_user_interactions
        ok_i = items >= cfg.min_item_interactions
        if not ok_u.any() or not ok_i.any():
            raise ValueError("no interactions left after the filter")
        if ok_u[users > 0].all() and ok_i[items > 0].all():
            return keep
        keep &= ok_u[ucode] & ok_i[icode]
        if not cfg.iterative_kcore:
            return keep


def _new_ids(codes: np.ndarray, uniques: pd.Index) -> tuple[np.ndarray, list[str]]:
    """Contiguous 1-based ids for the codes still present, in `contiguous_ids` order."""
    present = np.unique(codes)
    order = prepare.contiguous_ids([str(x) for x in uniques[present]])
    new = np.zeros(len(uniques), dtype=np.int32)
    new[uniques.get_indexer(order)] = np.arange(1, len(order) + 1, dtype=np.int32)
    return new[codes], order


def _items_table(
    source: ResolvedSource, cfg: DataConfig, item_order: list[str], train_counts: np.ndarray
) -> pa.Table:
    """Items in new-id order with their text Q_i, as the pipeline's items.parquet."""
    frames, bad = [], 0
    for path in source.item_paths:
        table, bad_lines = read_items(path, source.format)
        bad += len(bad_lines)
        frames.append(table.to_pandas())
    if bad > cfg.max_bad_lines:
        raise ValueError(f"{bad} malformed item lines > data.max_bad_lines")
    meta = pd.concat(frames, ignore_index=True).drop_duplicates("item_id", keep="first")
    meta = meta.set_index("item_id").reindex(item_order).astype(object)
    meta = meta.where(meta.notna(), None)
    records = meta.to_dict("records")
    texts = [prepare.item_text(r, cfg.text_template) for r in records]
    extras = [c for c in meta.columns if c not in ("title", "description")]
    cold, warm, _ = prepare.popularity_sections(
        train_counts[1:], cfg.cold_item_share, cfg.cold_item_threshold
    )
    table = pa.table(
        {
            "item_idx": np.arange(1, len(item_order) + 1, dtype=np.int32),
            "item_id": item_order,
            "title": [r["title"] or "No Title" for r in records],
            "description": [r["description"] or "No Description" for r in records],
            "text": texts,
            "num_train": train_counts[1:].astype(np.int32),
            "is_cold": cold,
            "is_warm": warm,
        },
        schema=ITEMS_SCHEMA,
    )
    for c in extras:
        values = [None if v is None else str(v) for v in meta[c]]
        table = table.append_column(pa.field(c, pa.string()), pa.array(values, pa.string()))
    return table


def prepare_with_pandas(config: Config, out_dir: Path) -> PandasResult:
    """The library's preparation steps in one process (no users table, no manifest)."""
    cfg = config.data
    laps = _Laps()
    source = resolve_source(cfg)
    df = _read_interactions(source, cfg)
    laps("read")

    # Each user's interactions in time order; lexsort is stable, the keys make it total.
    ucode, users = pd.factorize(df["user_id"])
    icode, items = pd.factorize(df["item_id"])
    order = np.lexsort(
        (df["source_line"].to_numpy(), df["file_index"].to_numpy(), df["timestamp"].to_numpy())
        + (ucode,)
    )
    df, ucode, icode = df.take(order), ucode[order], icode[order]
    if cfg.dedupe:
        first = ~pd.Index(ucode.astype(np.int64) * len(items) + icode).duplicated(keep="first")
        df, ucode, icode = df[first], ucode[first], icode[first]
    keep = _filter(ucode, icode, cfg)
    df, ucode, icode = df[keep], ucode[keep], icode[keep]
    user_idx, _ = _new_ids(ucode, users)
    item_idx, item_order = _new_ids(icode, items)

    by_user = pd.Series(user_idx)
    position = by_user.groupby(user_idx, sort=False).cumcount().to_numpy()
    size = by_user.groupby(user_idx, sort=False).transform("size").to_numpy()
    from_end = size - position  # 1 = last
    split = np.where((size >= 3) & (from_end <= 2), 3 - from_end, 0)  # 2 test, 1 valid
    inter = pd.DataFrame(
        {
            "user_idx": user_idx,
            "item_idx": item_idx,
            "timestamp": df["timestamp"].to_numpy(),
            "rating": df["rating"].to_numpy(),
            "position": position.astype(np.int32),
            "split": SPLIT_NAMES[split],
        }
    ).sort_values(["user_idx", "position"], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pandas(inter, schema=INTERACTIONS_SCHEMA, preserve_index=False),
        out_dir / "interactions.parquet",
    )
    laps("transform")

    # the users every stage trains on (a seeded share held out as cold users, the few-shot K)
    per_user = np.bincount(inter["user_idx"].to_numpy())
    roles = prepare.user_roles(per_user, cfg.cold_user_share, cfg.few_shot_users, config.seed)
    is_train = inter["split"].to_numpy() == "train"
    trained = roles[inter["user_idx"].to_numpy()] == prepare.ROLE_TRAIN
    train = inter["item_idx"].to_numpy()[is_train & trained]
    items_table = _items_table(
        source, cfg, item_order, np.bincount(train, minlength=len(item_order) + 1)
    )
    pq.write_table(items_table, out_dir / "items.parquet")
    laps("items")

    embedder = ItemTextEmbedder(cfg.text_encoder, batch_size=cfg.text_batch_size)
    laps("embed: load encoder")
    texts = items_table.column("text").to_numpy(zero_copy_only=False)
    emb = embedder({"item_idx": items_table.column("item_idx").to_numpy(), "text": texts})
    embeddings = np.asarray(emb["embedding"], dtype=np.float32)
    dim = embeddings.shape[1]
    pq.write_table(
        pa.table(
            {
                "item_idx": items_table.column("item_idx"),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(embeddings.reshape(-1), pa.float32()), dim
                ),
            },
            schema=item_text_emb_schema(dim),
        ),
        out_dir / "item_text_emb.parquet",
    )
    laps("embed: encode + write")
    return PandasResult(inter, items_table, embeddings, laps.seconds)


# --------------------------------------------------------------------------------------------
# The Ray Data version


@dataclass
class RayResult:
    seconds: float
    startup: float
    until_embedding: float | None
    manifest: dict
    data_dir: Path


class _LogTime(logging.Handler):
    """Records when the pipeline logs that it starts embedding (a cheap split of its time)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and record.getMessage().startswith("embedding "):
            self.at = time.perf_counter()


def _refuse_other_clusters() -> None:
    """Never run on (and slow down) another user's Ray: only a fresh local one."""
    if os.environ.pop("RAY_ADDRESS", None):
        log.warning("RAY_ADDRESS ignored: this benchmark starts its own local Ray")
    existing = find_bootstrap_address(None)
    if existing:
        sys.exit(
            f"a Ray cluster started with `ray start` is running at {existing}; "
            "init_ray would join it. Stop it (or wait) and rerun."
        )


def _noop() -> None:
    return None


def prepare_with_ray(config: Config, run_dir: Path) -> RayResult:
    _refuse_other_clusters()
    t0 = time.perf_counter()
    init_ray(config.ray)
    try:
        ray.get(ray.remote(_noop).options(num_cpus=0).remote())
        startup = time.perf_counter() - t0
        DataContext.get_current().enable_progress_bars = False
        marker = _LogTime()
        pipeline_log = logging.getLogger(PIPELINE_LOGGER)
        pipeline_log.addHandler(marker)
        try:
            t1 = time.perf_counter()
            manifest = prepare_data(config, run_dir)
            seconds = time.perf_counter() - t1
        finally:
            pipeline_log.removeHandler(marker)
    finally:
        ray.shutdown()
    until = None if marker.at is None else marker.at - t1
    return RayResult(seconds, startup, until, manifest, run_dir / "data")


# --------------------------------------------------------------------------------------------
# Comparing the outputs


def _canonical(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((columns["position"], columns["user_idx"]))
    return {k: np.asarray(v)[order] for k, v in columns.items()}


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    names = ("user_idx", "item_idx", "position", "split", "timestamp")
    return _canonical({n: table.column(n).to_numpy(zero_copy_only=False) for n in names})


def _summary(c: dict[str, np.ndarray]) -> dict[str, object]:
    splits, counts = np.unique(c["split"].astype(str), return_counts=True)
    return {
        "users": len(np.unique(c["user_idx"])),
        "items": len(np.unique(c["item_idx"])),
        "interactions": len(c["user_idx"]),
        "splits": dict(zip(splits.tolist(), counts.tolist(), strict=True)),
    }


def _explain(ray_c: dict[str, np.ndarray], pd_c: dict[str, np.ndarray], shown: int = 3) -> None:
    """Where two interaction tables differ: rows, users, and a few users side by side."""
    ray_pairs = set(zip(ray_c["user_idx"].tolist(), ray_c["item_idx"].tolist(), strict=True))
    pd_pairs = set(zip(pd_c["user_idx"].tolist(), pd_c["item_idx"].tolist(), strict=True))
    print(
        f"  (user, item) pairs only in ray: {len(ray_pairs - pd_pairs)}, "
        f"only in pandas: {len(pd_pairs - ray_pairs)}"
    )
    if len(ray_c["user_idx"]) != len(pd_c["user_idx"]):
        users = np.union1d(
            np.setxor1d(ray_c["user_idx"], pd_c["user_idx"]),
            [u for u, _ in ray_pairs ^ pd_pairs],
        )
    else:
        differs = np.zeros(len(ray_c["user_idx"]), dtype=bool)
        for k in ("user_idx", "item_idx", "position", "split"):
            differs |= ray_c[k] != pd_c[k]
        print(f"  rows that differ: {int(differs.sum())}")
        users = np.unique(ray_c["user_idx"][differs])
    print(f"  users involved: {len(users)} (first: {users[:10].tolist()})")
    for u in users[:shown]:
        for name, c in (("ray", ray_c), ("pandas", pd_c)):
            rows = c["user_idx"] == u
            last = [
                c[k][rows][-4:].tolist() for k in ("item_idx", "position", "split", "timestamp")
            ]
            print(
                f"  user {u} {name}: (item, pos, split, ts) last 4: {list(zip(*last, strict=True))}"
            )


def compare(ray_result: RayResult, pd_result: PandasResult) -> bool:
    ray_table = pq.read_table(ray_result.data_dir / "interactions")
    ray_c = _columns(ray_table)
    pd_c = _columns(pa.Table.from_pandas(pd_result.interactions, preserve_index=False))
    ray_s, pd_s = _summary(ray_c), _summary(pd_c)
    print(f"ray data: {ray_s}")
    print(f"pandas:   {pd_s}")
    manifest_counts = ray_result.manifest["counts"]
    print(
        f"manifest: users {manifest_counts['users']}, items {manifest_counts['items']}, "
        f"interactions {manifest_counts['interactions']}, splits {manifest_counts['splits']}, "
        f"raw {manifest_counts['raw']} (expected raw {ray_result.manifest['expected_raw']})"
    )
    same = ray_s == pd_s and all(
        np.array_equal(ray_c[k], pd_c[k]) for k in ("user_idx", "item_idx", "position", "split")
    )
    print(f"outputs identical: {same}")
    if not same:
        _explain(ray_c, pd_c)
    print(
        f"timestamps identical: {np.array_equal(ray_c['timestamp'], pd_c['timestamp'])}"
        if len(ray_c["timestamp"]) == len(pd_c["timestamp"])
        else "timestamps: lengths differ"
    )

    ray_items = pq.read_table(ray_result.data_dir / "items.parquet")
    same_items = ray_items.equals(pd_result.items)
    print(f"items tables identical (ids, titles, texts, train counts, cold flags): {same_items}")
    if not same_items:
        for name in pd_result.items.column_names:
            if name not in ray_items.column_names:
                print(f"  column {name!r} missing in ray's items")
            elif not ray_items.column(name).equals(pd_result.items.column(name)):
                print(f"  column {name!r} differs")
    ray_emb = pq.read_table(ray_result.data_dir / "item_text_emb.parquet")
    ray_vectors = np.stack(ray_emb.column("embedding").to_numpy(zero_copy_only=False))
    if ray_vectors.shape == pd_result.embeddings.shape:
        diff = float(np.abs(ray_vectors - pd_result.embeddings).max())
        print(
            f"embeddings {ray_vectors.shape}: max |ray - pandas| = {diff:.2e} "
            f"(batch composition differs, so float noise is expected)"
        )
    else:
        print(f"embeddings: shapes differ {ray_vectors.shape} vs {pd_result.embeddings.shape}")
    return same


# --------------------------------------------------------------------------------------------


def _warm_page_cache() -> float:
    """Import the encoder's libraries once in a throwaway process, so neither timed side
    pays for reading torch from a cold disk (each still pays its own imports)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sentence_transformers"], check=True)
    return time.perf_counter() - t


def _resolve(path: str) -> str:
    p = Path(path)
    return str(p if p.exists() or p.is_absolute() else ROOT / p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ml-1m.yaml")
    parser.add_argument("--keep", type=Path, help="copy both outputs here for inspection")
    args = parser.parse_args(argv)

    # Before torch or Ray start threads (init_ray passes these on to the workers).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    config = load_config([_resolve(args.config)])
    source = resolve_source(config.data)  # fetch (once) outside both timings
    warm = _warm_page_cache()
    print(
        f"config {args.config}: {source.name}; encoder {config.data.text_encoder}, batch "
        f"{config.data.text_batch_size}; load average {os.getloadavg()}; "
        f"page-cache warm-up {warm:.1f} s"
    )

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_dir = Path(tmp)
        ray_result = prepare_with_ray(config, tmp_dir / "ray_run")
        print(
            f"ray data prepare finished in {ray_result.seconds:.1f} s; "
            f"load average {os.getloadavg()}"
        )
        pd_result = prepare_with_pandas(config, tmp_dir / "pandas")
        import torch  # already imported by the encoder: only for its thread count

        laps = ", ".join(f"{k} {v:.2f} s" for k, v in pd_result.seconds.items())
        print(
            f"pandas prepare finished in {pd_result.total:.1f} s ({laps}; "
            f"torch threads {torch.get_num_threads()})"
        )
        identical = compare(ray_result, pd_result)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copytree(ray_result.data_dir, args.keep / "ray", dirs_exist_ok=True)
            shutil.copytree(tmp_dir / "pandas", args.keep / "pandas", dirs_exist_ok=True)

    n_items = pd_result.items.num_rows
    ratio = ray_result.seconds / pd_result.total
    print()
    print(
        f"ray data prepare: {ray_result.seconds:.1f} s   "
        f"(ray start-up {ray_result.startup:.1f} s, not counted)"
    )
    print(f"pandas prepare:   {pd_result.total:.1f} s")
    print(f"ratio ray/pandas: {ratio:.2f}x   (text embedding included in both; {n_items} items)")
    if ray_result.until_embedding is not None:
        ray_pre = ray_result.until_embedding
        print(
            f"without text embedding: ray {ray_pre:.1f} s (until the embedding step starts;"
            f" embedding + manifest {ray_result.seconds - ray_pre:.1f} s), pandas "
            f"{pd_result.without_embedding:.1f} s -> "
            f"{ray_pre / pd_result.without_embedding:.2f}x"
        )
    print(f"outputs identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
