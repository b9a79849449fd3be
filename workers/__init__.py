"""fusionrank.workers: the Celery app, routing and thin tasks, settings, and the ``fusionrank`` CLI (the composition root)."""
