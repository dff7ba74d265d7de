"""Shared test settings: a private cache for the converted Cell Ontology, few torch threads."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ.setdefault("CELLTYPE_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass
