"""Calibration tests run many tiny matmuls: on a shared 2-core machine, intra-op threads only add contention."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
