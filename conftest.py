"""Shared pytest fixtures. The offline data folder is found through ONE setting:
the environment variable BITDISTILL_DATA (e.g. export BITDISTILL_DATA=../shared/data)."""
import os
import pytest
import torch


def data_dir_or_fail():
    d = os.environ.get("BITDISTILL_DATA")
    if not d:
        pytest.fail("BITDISTILL_DATA is not set: point it at the offline data folder, "
                    "e.g. `export BITDISTILL_DATA=../shared/data` (see README, Tests).")
    if not os.path.isdir(d):
        pytest.fail(f"BITDISTILL_DATA={d!r} is not a directory: point it at the offline data folder.")
    return os.path.abspath(d)


@pytest.fixture(scope="session")
def data_dir():
    return data_dir_or_fail()


@pytest.fixture
def one_thread():
    """Model tests on one thread: a 2-thread OpenMP region on a busy 2-core machine waits for a
    scheduler slice per C call (threads: the kernel tests and test_packed_model_heads_and_threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    """Every skip is reported with its reason in the summary (-rs), so that nothing is skipped
    silently: e.g. a SIMD path this CPU lacks."""
    if "s" not in config.option.reportchars:
        config.option.reportchars += "s"
