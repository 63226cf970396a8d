"""The run directory and the manifest each stage writes beside its outputs.

A run directory holds everything one run makes: `data/`, `cf/`, `stage1/`, `stage2/`,
`eval/`, `tune/`. Each stage directory has a `manifest.json` (stage, config, versions, input
hashes, counts, metrics) written last and atomically, so a directory with a manifest is a
finished stage and one without is not. A stage reads the manifest of the one before and
refuses an input that is missing or does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: manifests record their inputs (allmrec.stages)
_VERSIONED = (
    "allmrec",
    "torch",
    "ray",
    "pyarrow",
    "numpy",
    "transformers",
    "sentence-transformers",
    "deepspeed",
)


class ArtifactError(RuntimeError):
    """A stage's input is missing, unfinished, or was made from something else."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_sha256(directory: str | Path) -> dict[str, str]:
    """sha256 of every file under `directory` (manifest excluded), by relative path."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(stage_dir: str | Path, stage: str, **fields: Any) -> dict:
    """Write `manifest.json` atomically (write then rename) and return it."""
    stage_dir = Path(stage_dir)
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        **fields,
    }
    tmp = stage_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, stage_dir / MANIFEST)
    return manifest


@contextmanager
def staged_output(final_dir: str | Path) -> Iterator[Path]:
    """A temporary directory beside `final_dir` that replaces it only if the block succeeds.

    A crash or an error leaves the previous `final_dir` (if any) untouched and no half-written
    output behind: nothing is ever read from a directory without its manifest.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)
