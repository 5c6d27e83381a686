"""Shared fixtures live in tests/fixtures/ as pytest plugins."""

import os

# The local Rays the tests start (and the CLI processes they spawn) run their workers at the test's
# priority, as `init_ray` does for the product: at Ray's default niceness 15 other load starves them.
os.environ.setdefault("RAY_worker_niceness", "0")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.mlflow",
]
