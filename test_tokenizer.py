"""Our tiktoken-based Qwen tokenizer must give exactly the ids of Hugging Face's `tokenizers` (the oracle,
loaded from the official Qwen3 tokenizer.json) on ~2,800 real strings from the data folder and on edge cases,
from every supported file layout.

    BITDISTILL_DATA=/work/shared/data python -m pytest -q test_tokenizer.py
"""
import json
import os
import pickle
import shutil
import unicodedata

import pytest
import tokenizers

from tokenizer import QWEN_ADDED_TOKENS, QWEN_PATTERN, Tokenizer, byte_to_unicode, load_tokenizer

# GPT-2's pre-tokenizer (r50k_base): digits grouped, contractions case-sensitive. Used for a negative check.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

CHAT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>"
# not NFC: NFC changes these, so ids differ unless we normalize like HF
NOT_NFC = ["cafe\u0301 e\u0301", "\u1100\u1161\u11a8 \u1112\u1161\u11ab", "\u212b ngstr\u00f6m \u212a elvin",
           "A\u030a\u0301", "<thin\u212a>", "e\u0301<|im_end|>\u0301"]
# HF cuts added tokens out of the raw text *before* NFC: NFC of the whole string would eat this "<|im_end|>"
SPECIAL_THEN_NFC = "x<|im_end|>\u0338"
EDGE_CASES = NOT_NFC + [
    "", " ", "Hello world", "  leading and trailing spaces  ", "a  b   c    d", "\t\ttabs\tand  \n\n\nnewlines \n",
    "a\r\nb\r\n\r\nc", "\r\n", " \r\n \n\r", "DON'T WE'LL I'M SHE'S THEY'RE WE'VE HE'D", "don't it's",
    "3.14159 1234567890123456 1,000,000 2024-01-31 \u0661\u0662\u0663\u0664 \u00bd",
    "\U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # emoji, skin tone, ZWJ family, ZWJ rainbow flag
    "你好，世界！日本語のテキスト。한국어 텍스트", "مرحبا بالعالم، كيف حالك؟", "Ａｂｃ ﬁ ligature x²",
    "word\u00a0nbsp zero\u200bwidth soft\u00adhyphen \x00\x01\x7f",
    "    def f(x):\n        return x  # code\n", "<<>> |> <| <|im_start <|not_a_token|>",
    CHAT, "<|endoftext|><|endoftext|>", SPECIAL_THEN_NFC, '<tool_call>{"a": 1}</tool_call>',
]


def real_strings(d):
    """~2,800 strings from every corpus in the data folder, bytes as stored (CRLF kept)."""
    def tsv(rel, n):
        with open(os.path.join(d, rel), encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f.read().split("\n")[1:n + 1] if line]
        return [field for row in rows for field in row[:-1]]  # all text columns, not the label

    def jsonl(rel, keys, n):
        with open(os.path.join(d, rel), encoding="utf-8") as f:
            return [json.loads(line)[k] for line in f.read().splitlines()[:n] for k in keys]

    out = tsv("glue/sst2/validation.tsv", 872) + tsv("glue/qnli/validation.tsv", 300) + tsv("glue/mnli/validation.tsv", 300)
    out += jsonl("cnndm/validation.jsonl", ["article", "highlights"], 20) + jsonl("corpus/c4_sample.jsonl", ["text"], 200)
    with open(os.path.join(d, "corpus/wikitext2_test.raw"), encoding="utf-8", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    out += lines[:400] + ["".join(lines[400:440])]
    with open(os.path.join(d, "corpus/tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read(60_000)
    return out + [text[i:i + 600] for i in range(0, len(text), 600)]


@pytest.fixture(scope="module")
def qwen3_dir(data_dir):
    return os.path.join(data_dir, "tokenizers", "qwen3")


@pytest.fixture(scope="module")
def strings(data_dir):
    s = real_strings(data_dir)
    assert len(s) >= 2000 and any("\r\n" in x for x in s)
    return s + EDGE_CASES


@pytest.fixture(scope="module")
def hf(qwen3_dir):
    return tokenizers.Tokenizer.from_file(os.path.join(qwen3_dir, "tokenizer.json"))


def hf_ids(hf, texts):
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def expected(hf, strings):
    return hf_ids(hf, strings)


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return load_tokenizer(qwen3_dir)


def test_parity_tokenizer_json(tok, strings, expected):
    assert tok.n_vocab == 151669 and tok.encode("Hello world 你好") == [9707, 1879, 220, 108386]
    mismatches = [s for s, want in zip(strings, expected) if tok.encode(s) != want]
    assert not mismatches, f"{len(mismatches)} strings differ from HF, first: {mismatches[0]!r}"
    assert tok.encode_batch(strings[:50]) == expected[:50]


@pytest.mark.parametrize("layout", ["tiktoken+config", "tiktoken alone", "vocab.json+merges.txt"])
def test_parity_other_layouts(layout, tok, strings, expected, data_dir, qwen3_dir, tmp_path):
    rank_file = os.path.join(data_dir, "tokenizers", "qwen.tiktoken")
    if layout == "tiktoken+config":
        shutil.copy(rank_file, tmp_path)
        shutil.copy(os.path.join(qwen3_dir, "tokenizer_config.json"), tmp_path)
        other = load_tokenizer(str(tmp_path / "qwen.tiktoken"))
    elif layout == "tiktoken alone":  # no tokenizer_config.json beside it: the default added-token list
        assert not os.path.exists(os.path.join(os.path.dirname(rank_file), "tokenizer_config.json"))
        other = load_tokenizer(rank_file)
    else:
        with open(os.path.join(qwen3_dir, "tokenizer.json"), encoding="utf-8") as f:
            model = json.load(f)["model"]
        with open(tmp_path / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        with open(tmp_path / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
        shutil.copy(os.path.join(qwen3_dir, "tokenizer_config.json"), tmp_path)
        other = load_tokenizer(str(tmp_path))
    assert other._special_tokens == tok._special_tokens
    assert other.eos_token_id == (None if layout == "tiktoken alone" else 151645)  # read from tokenizer_config.json
    mismatches = [s for s, want in zip(strings, expected) if other.encode(s) != want]
    assert not mismatches, f"{len(mismatches)} strings differ from HF, first: {mismatches[0]!r}"


def test_defaults_match_the_official_files(qwen3_dir):
    with open(os.path.join(qwen3_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN_PATTERN
    assert [t["content"] for t in tj["added_tokens"]] == QWEN_ADDED_TOKENS
    table = byte_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_negative_wrong_regex_or_no_nfc_changes_ids(tok, hf, strings, expected):
    """The parity tests can fail: GPT-2's regex, or skipping NFC, gives ids that differ from HF."""
    gpt2 = Tokenizer("gpt2-regex", pat_str=GPT2_PATTERN, mergeable_ranks=tok._mergeable_ranks,
                     special_tokens=tok._special_tokens)
    assert sum(gpt2.encode(s) != want for s, want in zip(strings, expected)) > 500
    no_nfc = Tokenizer("no-nfc", pat_str=tok._pat_str, mergeable_ranks=tok._mergeable_ranks,
                       special_tokens=tok._special_tokens, nfc=False)
    assert all(no_nfc.encode(s) != want for s, want in zip(NOT_NFC, hf_ids(hf, NOT_NFC)))
    want = hf_ids(hf, [SPECIAL_THEN_NFC])[0]
    assert 151645 in want and tok.encode(SPECIAL_THEN_NFC) == want
    assert tok.encode(unicodedata.normalize("NFC", SPECIAL_THEN_NFC)) != want  # NFC first, then split: wrong


def test_special_tokens(tok, hf):
    ids = tok.encode(CHAT)
    assert ids[:2] == [151644, 872] and ids.count(151645) == 2 and 151667 in ids  # <|im_start|> user, <think>
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643) and tok.eot_token == 151643
    assert tok.decode(ids) == CHAT
    with pytest.raises(ValueError, match="special token"):  # tiktoken's default behaviour, on request
        tok.encode(CHAT, allowed_special=set(), disallowed_special="all")
    as_text = tok.encode(CHAT, allowed_special=set())  # special strings encoded as ordinary text
    assert not any(tok.is_special_token(i) for i in as_text) and tok.decode(as_text) == CHAT
    # HF's split_special_tokens=True encodes only the `special` added tokens as text, and still cuts out
    # the others (<think>, <tool_call>, ...): the same as allowing just those.
    not_special = {t.content for t in hf.get_added_tokens_decoder().values() if not t.special}
    assert "<think>" in not_special and "<|im_end|>" not in not_special
    hf.encode_special_tokens = True
    try:
        assert tok.encode(CHAT, allowed_special=not_special) == hf.encode(CHAT, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False
    assert tok.encode("<|im_end|>", allowed_special={"<|im_end|>"}) == [151645]


def test_decode_roundtrip_and_pickle(tok, strings):
    nfc = [s for s in strings if unicodedata.normalize("NFC", s) == s]
    assert all(tok.decode(tok.encode(s)) == s for s in nfc)
    again = pickle.loads(pickle.dumps(tok))
    assert again.eos_token_id == tok.eos_token_id and all(again.encode(s) == tok.encode(s) for s in EDGE_CASES)


def test_clear_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "wordpiece").mkdir()
    (tmp_path / "wordpiece" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    for path in [tmp_path / "wordpiece", tmp_path / "wordpiece" / "tokenizer.json"]:  # folder or file path
        with pytest.raises(ValueError, match="WordPiece.*BPE"):
            load_tokenizer(str(path))
    with open(os.path.join(data_dir, "tokenizers", "qwen.tiktoken"), encoding="ascii") as f:
        head = f.read().splitlines()[:1000]
    (tmp_path / "bad.tiktoken").write_text("\n".join(head + ["not*base64 1000"]) + "\n")
    with pytest.raises(ValueError, match="line 1001.*corrupt"):
        load_tokenizer(str(tmp_path / "bad.tiktoken"))
    (tmp_path / "short.tiktoken").write_text("\n".join(head) + "\n")  # truncated: added ids 151643.. leave a gap
    with pytest.raises(ValueError, match="truncated"):
        load_tokenizer(str(tmp_path / "short.tiktoken"))


def test_train_bpe_small_vocab(tmp_path, data_dir):
    from tokenizer import train_bpe, save_tiktoken
    # by hand: "aaab aaab ab" -> chunks "aaab", " aaab", " ab"; pairs (a,a) 4, (a,b) 3, (" ",a) 2:
    # merge "aa" first; then (aa,a) 2, (a,b) 3, (" ",aa) 1, (" ",a) 1: merge "ab"; then (aa,ab) 2 wins
    ranks = train_bpe("aaab aaab ab", 259)
    assert [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1])][256:] == [b"aa", b"ab", b"aaab"]
    text = open(os.path.join(data_dir, "corpus", "tinyshakespeare.txt"), encoding="utf-8").read()[:100_000]
    ranks = train_bpe(text, 600)
    assert len(ranks) == 600 and sorted(ranks.values()) == list(range(600))
    tok = load_tokenizer(save_tiktoken(ranks, str(tmp_path / "toy")))
    assert tok.n_vocab == 603 and tok.eos_token_id == 600
    sample = text[50_000:52_000] + "<|endoftext|>"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and ids[-1] == 600
    assert len(ids) < 0.5 * len(sample.encode())  # it really compresses: well under 2 bytes per token
