import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tiny models gain nothing from threads, and two busy threads on a 2-core CI machine only contend.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the CLI tests that must not import torch run in subprocesses anyway
    pass

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fixtures_dir():
    return FIXTURES
