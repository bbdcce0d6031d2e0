"""Fixtures shared by several test files; each file opts in by name."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: a shared 2-core box stalls when oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
