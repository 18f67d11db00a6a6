"""Shared pytest fixtures. The offline data folder is found through ONE setting:
the environment variable BITDISTILL_DATA (e.g. export BITDISTILL_DATA=../shared/data)."""
import base64
import json
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


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A byte-level tokenizer (256 byte tokens + <|endoftext|> = 256) in the .tiktoken layout that
    tokenizer.py reads: the real text becomes bytes, so tiny models need only a 320-row embedding
    (Qwen's 151,936 rows would make every CPU step ~100x slower)."""
    d = tmp_path_factory.mktemp("tok")
    (d / "bytes.tiktoken").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"256": {"content": "<|endoftext|>", "special": True}}}))
    return str(d / "bytes.tiktoken")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random HF Qwen3 (2 layers, hidden 64, 320 embeddings), saved with save_pretrained."""
    from test_all import make_hf
    return make_hf(tmp_path_factory.mktemp("hf"), "qwen3", tie=True, vocab=320)[1]
