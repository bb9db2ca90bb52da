"""Shared by every test: the import paths, the `unit` / `integration` / `cuda` markers (from
the folder a test lives in), a fixed seed, and the tiny training setup of the run tests."""
import os
import sys

import pytest
import torch

# Tests import the project's top-level modules (config, main, models) from the repo root,
# and the shared helpers from tests/helpers.
TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(TESTS), TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from helpers.runs import TINY, write_color_folder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = os.path.basename(os.path.dirname(str(item.fspath)))
        if kind in ('unit', 'integration', 'cuda'):  # tests/cuda skips itself without a GPU (its conftest)
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """A JPEG folder of three colour classes (train/, val/), made once per test module."""
    return write_color_folder(tmp_path_factory.mktemp('colors'))


@pytest.fixture(scope='module')
def cfg_file(data_root, tmp_path_factory):
    """The tiny Swin config over `data_root`."""
    path = tmp_path_factory.mktemp('cfg') / 'tiny.yaml'
    path.write_text(TINY.format(data=data_root))
    return str(path)
