"""Shared pytest fixtures. The offline data folder is found through ONE setting:
the environment variable BITDISTILL_DATA (e.g. export BITDISTILL_DATA=../shared/data)."""
import os
import pytest


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
