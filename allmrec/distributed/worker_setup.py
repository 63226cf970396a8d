"""What every worker process of a Ray started by allmrec runs first (Ray's
`worker_process_setup_hook`, set by `runtime.init_ray` for a local Ray)."""

from __future__ import annotations

import os

import ray


def pin_ray_address() -> None:
    """Name this worker's own Ray in RAY_ADDRESS.

    Ray code that looks for "the" local Ray without an address scans the machine's processes
    and fails when it finds two (another user's local Ray, `allmrec serve` beside a search, a
    test session beside the Ray it drives). Ray Train's placement-group cleaner does so: it
    then dies, and the Train run of a Tune trial that ASHA stops (Tune kills its actor, and
    with it the run's controller) keeps its workers' CPUs reserved for good, so that the next
    trials wait forever for them (seen here: a search hung after its first trial ended)."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
