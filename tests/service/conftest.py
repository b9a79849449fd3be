from tests.service.world import service_world  # noqa: F401  (the shared fixture)
