"""The local Ray that allmrec starts: what its workers are told."""

from __future__ import annotations

import pytest


def test_every_worker_names_its_own_ray(ray_local):
    """Ray code in a worker that looks for "the" local Ray (Ray Train's placement-group
    cleaner) must find this one, also with another Ray on the machine (the Tune test runs
    one beside this session's)."""
    from allmrec.distributed.runtime import started_locally

    ray = ray_local
    if not started_locally():
        pytest.skip("this session joined a Ray it did not start ($RAY_ADDRESS)")

    @ray.remote(num_cpus=0)
    def ray_address() -> str | None:
        import os

        return os.environ.get("RAY_ADDRESS")

    assert ray.get(ray_address.remote()) == ray.get_runtime_context().gcs_address
