"""Fixtures shared by the flow tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny tensors gain nothing from more, and on a shared, oversubscribed
    CPU OpenMP's spinning threads made such tests ~10x slower. The thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
