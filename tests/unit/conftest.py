"""The unit tier: the library without Ray. A test here that starts Ray fails, so the tier
stays fast and what it covers stays Ray-free (`make test-fast`)."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_ray():
    yield
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), (
        "this test started Ray: it belongs in tests/integration"
    )
