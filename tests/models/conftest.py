"""One intra-op thread for the task-model tests: their tensors are tiny, and on a shared 2-core box a second
OpenMP thread only spins against the other processes (measured: several times slower under load)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
