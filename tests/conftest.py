"""Shared fixtures live in tests/fixtures/ as pytest plugins."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.mlflow",
]
