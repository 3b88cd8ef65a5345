"""Shared fixtures. Tiers by folder: tests/unit, tests/integration, tests/e2e get their marker here.

Fixture modules live in tests/fixtures/ (one per area) and are loaded as plugins below.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # there is no hub here; never wait 23 s for it
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.services",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.workflow_services",
    "tests.fixtures.cluster",
    "tests.fixtures.lm_eval_tasks",
    "tests.fixtures.budget",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}tests{os.sep}{tier}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, tier))
