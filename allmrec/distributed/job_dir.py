"""Where `ray job submit --working-dir` runs a driver, and what that means for its paths.

Ray unpacks a submitted job's working dir under the session's `runtime_resources/` and runs
the entry point there. This module is the one place that knows it (it imports no Ray: the CLI
calls it before deciding whether a command needs Ray at all).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

from allmrec.storage import StorageError, is_uri

log = logging.getLogger(__name__)

JOB_COPY_ENV = "ALLMREC_JOB_WORKING_COPY"


def inside_job_working_dir() -> bool:
    """This driver runs from a submitted job's working dir (or the copy made of it)."""
    return JOB_COPY_ENV in os.environ or "runtime_resources" in Path.cwd().parts


def leave_job_working_dir() -> None:
    """Move a submitted job's driver into a private copy of its working dir.

    Ray 2.60 deletes and re-extracts a job's working dir on a node whenever it sets up a new
    runtime env that carries it (Ray Train's workers and Ray Data's actors add env vars of
    their own), which pulls the directory out from under the driver running in it: the next
    `os.getcwd()` fails. A copy that Ray does not manage keeps the driver's relative paths
    (`--config configs/x.yaml`) working for the whole job.
    """
    cwd = Path.cwd()
    if "runtime_resources" not in cwd.parts or JOB_COPY_ENV in os.environ:
        return
    copy = Path(tempfile.mkdtemp(prefix="allmrec-job-"))
    shutil.copytree(cwd, copy, symlinks=True, dirs_exist_ok=True)
    os.chdir(copy)
    os.environ[JOB_COPY_ENV] = str(copy)
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    log.debug("job driver runs in %s, a copy of %s", copy, cwd)


def refuse_relative_home(home: str) -> None:
    """A relative run home inside a job's working dir would be written into a directory Ray
    (or this driver's exit) deletes: refuse it before anything is trained into it."""
    if not is_uri(home) and not Path(home).is_absolute() and inside_job_working_dir():
        raise StorageError(
            f"storage: the run directory {home!r} is relative, and this job runs from a "
            "temporary copy of its working dir, which Ray deletes: give an absolute "
            "path every node mounts or an s3:// / gs:// URI (--set storage=... or "
            "--run-dir ...)"
        )
