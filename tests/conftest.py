import threading

import pytest
import torch

import lightning_megatrain  # noqa: F401  registers "megatrain"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_thread_left():
    """Every test must leave no megatrain worker thread running."""
    yield
    alive = [t.name for t in threading.enumerate() if t.name.startswith("megatrain")]
    assert not alive, f"megatrain threads still running: {alive}"
