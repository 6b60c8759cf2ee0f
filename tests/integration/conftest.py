import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    """The real model wants both cores; the tiny-model tests elsewhere run on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(previous)
