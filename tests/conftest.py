import os, sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: import common, ...


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One thread for the in-process tests too: the tiny models' ops take microseconds, and two OpenMP
    threads on a shared 2-core machine wait on each other for milliseconds per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
