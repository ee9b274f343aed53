"""Session-wide test settings.

- One intra-op thread: the tests run tiny models, whose microsecond-sized ops run up to 10x
  slower when torch hands them between two threads of a busy 2-core machine.
- Generated datasets go to a temporary ``SUITE_DATA_DIR``, so tests never read a stale cache
  from ``data/generated/`` nor write into the checkout.
- No hub access: an accidental download fails at once instead of hanging.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _tiny_model_settings(tmp_path_factory: pytest.TempPathFactory):
    threads, data = torch.get_num_threads(), os.environ.get("SUITE_DATA_DIR")
    torch.set_num_threads(1)
    os.environ["SUITE_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    yield
    torch.set_num_threads(threads)
    if data is None:
        os.environ.pop("SUITE_DATA_DIR", None)
    else:
        os.environ["SUITE_DATA_DIR"] = data
