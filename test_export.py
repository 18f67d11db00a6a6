"""
export.py: a llama-architecture 1.58-bit student with the paper's SubLN placement as a llama.cpp
`bitnet` GGUF. The file read back holds our codes, Δ, norms and embedding exactly (by our own
container reader, itself held against the `gguf` package's); llama.cpp's graph written in NumPy
from src/models/bitnet.cpp gives our model's logits; each deliberate break of the writer (SubLN
weights as ones, SubLN from the next layer, Q/K in llama's permuted order, no Δ, o_proj's Δ doubled)
is caught; what the graph cannot hold is refused in one line.

    BITDISTILL_DATA=../shared/data python -m pytest -q test_export.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import gguf_model
from model import Qwen3, Qwen3Config
from subln import convert_to_bitnet

HERE = os.path.dirname(os.path.abspath(__file__))


def student(seed=0, subln_all=False, weight_quant="absmean", quant_eps="add", **kw):
    """A tiny SmolLM2-shaped student (llama: no q/k-norm, tied, SmolLM2's vocabulary) converted with
    SubLN before o_proj and down_proj only; every norm randomised so that a swapped one shows."""
    torch.manual_seed(seed)
    c = dict(vocab_size=49152, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, qk_norm=False, model_type="llama",
             rope_theta=100000.0)
    c.update(kw)
    m = Qwen3(Qwen3Config(**c))
    convert_to_bitnet(m, subln=True, subln_all=subln_all, weight_quant=weight_quant, quant_eps=quant_eps)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if n.endswith("norm.weight") or "subln" in n
                    else 0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def tok_gguf():
    return gguf_model.gguf_path("smollm2")   # the base model's tokenizer metadata goes into the file


def test_exact_file_holds_the_codes_and_gives_our_logits(tmp_path, tok_gguf):
    import gguf
    m = student()
    path = str(tmp_path / "s.gguf")
    export.export(m, tok_gguf, path)
    r = export.check(path, m)
    assert r["top1_agree"] == r["positions"] and r["max_abs_diff"] < 1e-4 * r["logit_std"], r
    # our container reader against the gguf package's, on every tensor and the metadata that matters
    meta, tensors = export.read_container(path)
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(tensors)
    for t in reader.tensors:
        assert tuple(int(s) for s in reversed(t.shape)) == tensors[t.name][1]
        assert np.asarray(t.data).tobytes() == tensors[t.name][2], t.name
    for key in ("bitnet.block_count", "bitnet.rope.freq_base", "bitnet.attention.layer_norm_rms_epsilon",
                "tokenizer.ggml.pre", "tokenizer.ggml.tokens"):
        assert reader.fields[key].contents() == pytest.approx(meta[key]) if isinstance(meta[key], float) \
            else reader.fields[key].contents() == meta[key], key
    assert meta["general.architecture"] == "bitnet" and meta["bitnet.rope.freq_base"] == 100000.0
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert "output.weight" not in tensors                         # the head is the embedding
    assert tensors["blk.0.attn_q.scale"][1] == (1,)


def dequantize_row_q2_0(block_bytes):
    """ggml-quants.c's dequantize_row_q2_0 for one block, transcribed as a loop."""
    d = np.frombuffer(bytes(block_bytes[:2]), np.float16)[0].astype(np.float32)
    qs = block_bytes[2:]
    return [(int((qs[j // 4] >> ((j % 4) * 2)) & 0x03) - 1) * d for j in range(64)]   # (int)q - 1


def test_compact_q2_0_decodes_to_the_codes(tmp_path, tok_gguf):
    m = student(1)
    path = str(tmp_path / "q2.gguf")
    export.export(m, tok_gguf, path, compact=True)
    meta, tensors = export.read_container(path)
    kind, shape, raw = tensors["blk.1.ffn_down.weight"]
    assert kind == export.GGMLType.Q2_0 and shape == (128, 192) and len(raw) == 128 * 3 * 18
    codes, _ = export.weight_quant_int(m.model.layers[1].mlp.down_proj.weight.detach())
    rows = np.frombuffer(raw, np.uint8).reshape(128, 3 * 18)
    for n in (0, 77, 127):                                            # the loop of ggml, row by row
        got = sum((dequantize_row_q2_0(rows[n, b * 18:(b + 1) * 18]) for b in range(3)), [])
        assert got == codes[n].float().tolist()
    r = export.check(path, m)
    assert r["top1_agree"] == r["positions"], r
    export.export(m, tok_gguf, str(tmp_path / "f32.gguf"))
    codes_n = sum(p.numel() for n, p in m.named_parameters() if n.endswith("proj.weight"))
    saved = os.path.getsize(tmp_path / "f32.gguf") - os.path.getsize(path)    # 32 bits -> 2.25 bits per code
    assert abs(saved - codes_n * (4 - 18 / 64)) < 32 * 14 * 2, saved           # up to the alignment padding


def permute_qk(w, n_head):   # llama.cpp's converter order for a llama model (gguf_model.unpermute_qk inverts it)
    out, C = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, C).swapaxes(1, 2).reshape(out, C)


BREAKS = {
    "subln_weights_as_ones": lambda n, a: np.ones_like(a) if "sub_norm" in n else a,
    "subln_of_the_next_layer": None,          # handled below: layer 0 gets layer 1's SubLN
    "qk_in_llama_order": lambda n, a: permute_qk(a, 4 if "attn_q" in n else 2) if n.endswith(("attn_q.weight",
                                                                                             "attn_k.weight")) else a,
    "no_scale_tensors": "drop",
    "o_proj_scale_doubled": lambda n, a: a * 2 if n.endswith("attn_output.scale") else a,
}


@pytest.mark.parametrize("brk", sorted(BREAKS))
def test_each_break_of_the_writer_is_caught(tmp_path, tok_gguf, monkeypatch, brk):
    m = student(2)
    real = export.tensors_of

    def broken(model, compact):
        ts = real(model, compact)
        if BREAKS[brk] == "drop":
            return [t for t in ts if not t[0].endswith(".scale")]
        if BREAKS[brk] is None:
            by = {t[0]: t for t in ts}
            return [(n, by[n.replace("blk.0.", "blk.1.")][1], k, s) if n.startswith("blk.0.") and "sub_norm" in n
                    else (n, a, k, s) for n, a, k, s in ts]
        return [(n, BREAKS[brk](n, a), k, s) for n, a, k, s in ts]
    monkeypatch.setattr(export, "tensors_of", broken)
    path = str(tmp_path / "b.gguf")
    export.export(m, tok_gguf, path)
    with pytest.raises(ValueError, match="disagrees with our model"):
        export.check(path, m)


def test_what_the_graph_cannot_hold_is_refused(tmp_path, tok_gguf):
    cases = {"q/k-norm": student(qk_norm=True, model_type="qwen3"), "untied": student(tie_word_embeddings=False)}
    for why, m in cases.items():
        with pytest.raises(ValueError, match=why):
            export.export(m, tok_gguf, str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="--subln_at o_down"):
        export.export(student(subln_all=True), tok_gguf, str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="scale per row"):
        export.export(student(weight_quant="perchannel", quant_eps="clamp"), tok_gguf, str(tmp_path / "x.gguf"))
    assert not os.path.exists(tmp_path / "x.gguf")
    m = student(weight_quant="gptq", quant_eps="clamp")       # one scale per matrix: exported, and exact
    export.export(m, tok_gguf, str(tmp_path / "g.gguf"))
    r = export.check(str(tmp_path / "g.gguf"), m)
    assert r["top1_agree"] == r["positions"] and r["max_abs_diff"] < 1e-4 * r["logit_std"], r
    # the command line: one error line, nothing written
    ck = tmp_path / "qwen3.pt"
    q = cases["q/k-norm"]
    torch.save({"model": q.state_dict(), "config": q.config.to_dict(), "args": {"tokenizer": tok_gguf}}, ck)
    p = subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "--ckpt", str(ck), "--out",
                        str(tmp_path / "q.gguf")], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert [l for l in p.stderr.splitlines() if "error:" in l][0].startswith("export.py: error: this checkpoint "
                                                                             "cannot be a llama.cpp bitnet GGUF")
    assert not os.path.exists(tmp_path / "q.gguf")


def test_command_line_export_then_check(tmp_path, tok_gguf):
    m = student(3)
    ck = tmp_path / "s.pt"
    torch.save({"model": m.state_dict(), "config": m.config.to_dict(), "args": {"tokenizer": tok_gguf}}, ck)
    out = tmp_path / "s.gguf"
    run = lambda *a: subprocess.run([sys.executable, os.path.join(HERE, "export.py"), *map(str, a)],   # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    p = run("--ckpt", ck, "--out", out, "--compact")
    assert p.returncode == 0 and "Q2_0 codes" in p.stdout, p.stderr
    p = run("--ckpt", ck, "--out", out)
    assert p.returncode != 0 and "exists: pass --overwrite" in p.stderr
    p = run("--ckpt", ck, "--check", out)
    assert p.returncode == 0 and "top-1 64/64" in p.stdout, p.stdout + p.stderr


def test_the_real_model_converted_exports_and_agrees(tmp_path, tok_gguf):
    """SmolLM2-135M-Instruct (the real GGUF) converted by stage 1 with the paper's SubLN placement:
    576 wide, 9 heads of 64, 30 layers; the compact file, read back and run as llama.cpp's graph."""
    m = convert_to_bitnet(gguf_model.load_gguf("smollm2"), subln=True, subln_all=False).eval()
    path = str(tmp_path / "smollm2.gguf")
    export.export(m, tok_gguf, path, compact=True)
    r = export.check(path, m)
    assert r["top1_agree"] == r["positions"] and r["max_abs_diff"] < 1e-4 * r["logit_std"], r


def test_task_accuracy_compares_the_same_prompts(tok_gguf):
    """task_accuracy() with the export's greedy decoding played by our own model, recomputed from scratch at
    every token: its predictions equal the batched, left-padded, KV-cached evaluation of tasks.evaluate row
    for row, so the prompts, the answer length and the stop token are distill.py's."""
    from tokenizer import load_tokenizer
    m = student(5)
    ref = export.dequantized(m)

    @torch.no_grad()
    def greedy(ids, n, stop):
        seq, out = torch.tensor(ids), []
        while len(out) < n:
            t = int(ref(seq[None])[0, -1].argmax())
            if t == stop:
                break
            out.append(t)
            seq = torch.cat([seq, torch.tensor([t])])
        return out

    tok = load_tokenizer(tok_gguf)
    r = export.task_accuracy(greedy, m, tok, "sst2", {"prompt": "chat", "max_len": 64}, os.environ["BITDISTILL_DATA"],
                             limit=12)
    assert r["rows"] == 12 and r["export_agrees_with_ours_dequantized"] == 12, r
    assert r["export"] == r["ours_dequantized"]
    # another prompt (no chat template) gives other predictions: the agreement above is not trivial
    plain = export.task_accuracy(lambda ids, n, stop: greedy(tok.encode("Review: x"), n, stop), m, tok, "sst2",
                                 {"prompt": "chat", "max_len": 64}, os.environ["BITDISTILL_DATA"], limit=12)
    assert plain["export_agrees_with_ours_dequantized"] < 12, plain
