import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    # Denormals slow CPU kernels by up to 2x (see shared/research). One thread: the test models are tiny, so
    # threading only adds overhead, and subprocess tests (two ranks) would otherwise oversubscribe 2 cores.
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    yield
