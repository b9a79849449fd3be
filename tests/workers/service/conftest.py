import sys

import pytest

from tests.workers.service.world import service_world  # noqa: F401  (the shared fixture)


@pytest.fixture(autouse=True)
def _keep_switch_interval():
    """``fusionrank serve`` sets the interpreter's switch interval for its process; invoked in-process by a test,
    it must not change it for the tests after."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)
