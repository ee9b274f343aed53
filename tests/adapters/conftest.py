"""Adapter tests run tiny models: one intra-op thread is 10-20x faster than two on a busy machine
(thread hand-off dominates microsecond-sized ops). The previous setting is restored afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
