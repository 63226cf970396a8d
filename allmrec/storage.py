"""Where a run lives: a local directory, a shared filesystem path, or an object store.

A run has one durable home, `<storage>/<name>` (e.g. `runs/ml-100k-cpu`,
`s3://bucket/allmrec/ml-1m`). Library code only ever reads and writes a local directory, so
every process that touches a run - the driver, a Train worker, an evaluation task, a Serve
replica, on whatever node - works in its own node's copy of the run (`RunStorage.local`) and
moves finished stage directories between that copy and the home:

- `pull(*stages)` before reading: a stage whose manifest in the home differs from the local
  one is downloaded (into a temporary directory, then swapped in, under a file lock, so two
  workers on one node download it once);
- `push(stage)` after writing: the stage's files, then its manifest last, so in the home too
  a stage directory with a manifest is finished and one without is not.

A home that is a plain path is its own local copy and both are no-ops: that is the default,
and on a cluster it must be a filesystem every node mounts (NFS, EFS, Filestore). A URI home
(s3://, gs://, file://, or any fsspec protocol) assumes nothing shared between nodes: each
node keeps its copy under `$ALLMREC_CACHE/runs/`. Filesystems come from pyarrow, and from
fsspec for protocols pyarrow does not know.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from allmrec.manifest import MANIFEST, staged_output

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage location that cannot be used (unknown protocol, unreachable, refused)."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a path or a URI (pathlib would collapse `s3://` to `s3:/`)."""
    if not is_uri(root):
        return str(Path(root, *parts))
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `uri` and the path inside it: pyarrow's, else fsspec's; a plain path
    is on the local filesystem."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as pyarrow_error:
        try:
            import fsspec.core
        except ImportError:
            raise StorageError(f"{uri}: pyarrow cannot open it ({pyarrow_error})") from None
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as fsspec_error:
            raise StorageError(
                f"{uri}: neither pyarrow ({pyarrow_error}) nor fsspec ({fsspec_error}) can open "
                "it; install the fsspec package of its protocol (e.g. adlfs for abfs://)"
            ) from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def cache_dir() -> Path:
    """This machine's cache ($ALLMREC_CACHE, default ~/.cache/allmrec): fetched data sets, the
    dequantized LLM, per-node copies of remote runs."""
    return Path(os.environ.get("ALLMREC_CACHE", Path.home() / ".cache" / "allmrec"))


@dataclass(frozen=True)
class RunStorage:
    """A run's home (`home`, a path or URI) and this node's working copy (`local`)."""

    home: str
    local: Path

    @classmethod
    def open(cls, home: str | Path) -> RunStorage:
        home = str(home)
        if not is_uri(home):
            path = Path(home).resolve()
            return cls(home=str(path), local=path)
        home = home.rstrip("/")
        digest = hashlib.sha256(home.encode()).hexdigest()[:12]
        name = home.rsplit("/", 1)[-1] or "run"
        return cls(home=home, local=cache_dir() / "runs" / f"{name}-{digest}")

    @property
    def name(self) -> str:
        """The run's name: the last part of its home."""
        return self.home.rstrip("/").rsplit("/", 1)[-1]

    @property
    def remote(self) -> bool:
        return is_uri(self.home)

    def uri(self, *parts: str) -> str:
        """A location under the home, for what Ray writes itself (Train checkpoints, Tune)."""
        return join(self.home, *parts)

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return filesystem(self.home)

    def remote_manifest(self, stage: str) -> bytes | None:
        fs, base = self._fs()
        try:
            with fs.open_input_stream(f"{base}/{stage}/{MANIFEST}") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                return None
            raise StorageError(f"{self.uri(stage, MANIFEST)}: {err}") from err

    def has(self, stage: str) -> bool:
        """Whether the home holds a finished `stage`."""
        if not self.remote:
            return (self.local / stage / MANIFEST).is_file()
        return self.remote_manifest(stage) is not None

    def pull(self, *stages: str) -> Path:
        """Bring the finished `stages` of the home into the local copy; returns `local`."""
        if not self.remote:
            return self.local
        from filelock import FileLock

        self.local.mkdir(parents=True, exist_ok=True)
        fs, base = self._fs()
        for stage in stages:
            with FileLock(str(self.local / f".{stage}.lock")):
                remote = self.remote_manifest(stage)
                target = self.local / stage
                if remote is None:
                    # not made (or removed) in the home: a copy here would be stale; the
                    # stage that reads it says that it is missing
                    shutil.rmtree(target, ignore_errors=True)
                    continue
                mine = target / MANIFEST
                if mine.is_file() and mine.read_bytes() == remote:
                    continue
                log.info("pulling %s into %s", self.uri(stage), target)
                with staged_output(target) as tmp:  # swapped in whole, or not at all
                    pafs.copy_files(
                        f"{base}/{stage}",
                        str(tmp),
                        source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem(),
                    )
        return self.local

    def push(self, stage: str, files: list[str] | None = None) -> None:
        """Upload the local `stage` directory to the home, its manifest last. With `files`,
        upload only those (paths inside the stage) and leave the rest of the home's copy."""
        if not self.remote:
            return
        source = self.local / stage
        fs, base = self._fs()
        target = f"{base}/{stage}"
        if files is None:
            # the old manifest first: from here until the new one lands the stage is unfinished
            fs.delete_dir_contents(target, missing_dir_ok=True)
            files = sorted(
                str(p.relative_to(source))
                for p in source.rglob("*")
                if p.is_file() and p.name != MANIFEST
            )
            if (source / MANIFEST).is_file():
                files.append(MANIFEST)
        log.info("pushing %s (%d files) to %s", source, len(files), self.uri(stage))
        local_fs = pafs.LocalFileSystem()
        for name in files:
            parent = f"{target}/{name}".rsplit("/", 1)[0]
            fs.create_dir(parent, recursive=True)
            pafs.copy_files(
                str(source / name),
                f"{target}/{name}",
                source_filesystem=local_fs,
                destination_filesystem=fs,
            )


def open_run(run: str | Path | RunStorage) -> RunStorage:
    """A run given as its storage, a path or a URI."""
    return run if isinstance(run, RunStorage) else RunStorage.open(run)


def create_once(uri: str, text: str) -> bool:
    """Create the file at `uri` (a path or URI) unless it exists; True when this call made it."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
    return True


class RecordLog:
    """A log of JSON records under `location` (a path or URI), one file per key: writers on
    any node add records without a shared file or lock, each key at most once (`claim`);
    readers replay the records they have not seen yet (`new_records`)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.fs, self.path = filesystem(location)
        self.seen: set[str] = set()

    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:32] + ".json"

    def _read(self, name: str) -> dict:
        import json

        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return json.loads(f.read())

    def claim(self, key: str, record: dict) -> dict | None:
        """Writes `record` as the one record of `key` unless `key` has one already: None when
        this call wrote it, else the record that is there (whoever wrote it).

        Exclusive on a local or mounted filesystem: the record is written whole under a
        hidden name, then hard-linked to its key's name, which fails if that name exists. An
        object store has no such operation here: there the key is checked just before the
        upload, so two writers of one key in the same instant could both write it (the later
        upload wins)."""
        import json

        name = self._name(key)
        final = f"{self.path}/{name}"
        self.fs.create_dir(self.path, recursive=True)
        data = json.dumps(record).encode()
        self.seen.add(name)  # this process applies it (or the one there) itself
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{self.path}/.{name}.{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError:
                return self._read(name)
            finally:
                os.unlink(tmp)
            return None
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            return self._read(name)
        with self.fs.open_output_stream(final) as f:  # appears whole when the upload ends
            f.write(data)
        return None

    def new_records(self) -> list[dict]:
        """The records written since the last call (by anyone but this log), in name order."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        names = sorted(
            info.base_name
            for info in self.fs.get_file_info(selector)
            if info.is_file
            and info.base_name.endswith(".json")
            and not info.base_name.startswith(".")
        )
        records = []
        for name in names:
            if name in self.seen:
                continue
            records.append(self._read(name))
            self.seen.add(name)
        return records
