"""
Foundation tests: model.py against Hugging Face transformers (the oracle, used only here),
bitlinear.py (Eq. 1-3) on hand-computed examples, subln.py (Eq. 4-5), and the clear errors.

    BITDISTILL_DATA=../shared/data python -m pytest -q
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import bitlinear
import model as model_mod
from bitlinear import (BitLinear, activation_quant, activation_quant_int, bitlinear_int_reference,
                       weight_quant, weight_quant_int, round_clip)
from model import Qwen3, Qwen3Config
from subln import SubLN, build_model, convert_to_bitnet
from training import load_model

import transformers  # noqa: E402  (tests-only oracle, in requirements.txt: a missing install fails, never skips)


# ----------------------------------------------------------------------------- tiny HF checkpoints

def make_hf(tmp_path, kind="qwen3", tie=False, n_head=4, n_kv=2, shard=False, seed=0, vocab=256):
    """Builds a small random HF model, randomises *every* parameter (norm weights and biases too,
    so that a missing q/k norm or bias cannot hide behind an all-ones / all-zeros init), saves it."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=n_head, num_key_value_heads=n_kv, tie_word_embeddings=tie,
                  rope_theta=10000.0, max_position_embeddings=256)
    if kind == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    elif kind == "llama":   # SmolLM2's family (model.py: Qwen2 without biases)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(eos_token_id=None, bos_token_id=None, **common))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    d = tmp_path / f"{kind}_tie{tie}_{n_head}x{n_kv}_shard{shard}"
    hf.save_pretrained(d, max_shard_size="40KB" if shard else "10GB")
    return hf.eval(), str(d)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


CASES = [("qwen3", False, 4, 4), ("qwen3", True, 4, 2), ("qwen3", False, 8, 2),
         ("qwen2", True, 4, 2), ("qwen2", False, 4, 1), ("llama", True, 4, 2)]


@pytest.mark.parametrize("kind,tie,n_head,n_kv", CASES)
def test_logits_and_greedy_match_transformers(tmp_path, kind, tie, n_head, n_kv):
    hf, path = make_hf(tmp_path, kind, tie, n_head, n_kv)
    ours = Qwen3.from_pretrained(path).eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert rel_err(ref, got) < 1e-4
    # 20 greedy tokens identical (ours uses its KV cache; HF its own)
    prompt = idx[:1, :8]
    ref_ids = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          attention_mask=torch.ones_like(prompt))
    got_ids = ours.generate(prompt, max_new_tokens=20)
    assert torch.equal(ref_ids, got_ids)


def test_sharded_checkpoint_loads(tmp_path):
    hf, path = make_hf(tmp_path, "qwen3", shard=True)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, Qwen3.from_pretrained(path)(idx)) < 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(tmp_path, side):
    _, path = make_hf(tmp_path, "qwen3", n_head=4, n_kv=2)
    m = Qwen3.from_pretrained(path).eval()
    rows = [torch.randint(0, 256, (n,)) for n in (12, 7, 3)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        batched = m(idx, attention_mask=mask)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            assert torch.allclose(batched[i, sl], m(r[None])[0], atol=1e-5, rtol=1e-4)
    if side == "left":  # batched greedy generation equals row-by-row generation
        with torch.no_grad():
            out = m.generate(idx, 10, attention_mask=mask)
            for i, r in enumerate(rows):
                assert torch.equal(out[i, T:], m.generate(r[None], 10)[0, len(r):])


def test_top_p_sampling_stays_in_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {model_mod.sample(logits, 1.0, 0.7, g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
    assert model_mod.sample(logits, 0.0, 1.0).item() == 0


# The parity test must be able to fail: each of these deliberate bugs breaks it.
def interleaved_rope(x, cos, sin):  # the GPT-J layout instead of Qwen's rotate-half
    cos, sin = cos[:, None, :, ::2].repeat_interleave(2, -1), sin[:, None, :, ::2].repeat_interleave(2, -1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return x * cos + torch.stack([-x2, x1], -1).flatten(-2) * sin


@pytest.mark.parametrize("bug", ["rope", "qk_norm", "gqa"])
def test_parity_detects_bugs(tmp_path, monkeypatch, bug):
    hf, path = make_hf(tmp_path, "qwen3", n_head=4, n_kv=2)
    ours = Qwen3.from_pretrained(path).eval()
    if bug == "rope":
        monkeypatch.setattr(model_mod, "apply_rope", interleaved_rope)
    elif bug == "qk_norm":
        for blk in ours.model.layers:
            blk.self_attn.qk_norm = False
    else:  # kv head h // rep  ->  kv head h % n_kv
        monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                            lambda t, r, dim: t.repeat(*[r if d == dim else 1 for d in range(t.dim())]))
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, ours(idx)) > 1e-3


# ----------------------------------------------------------------------------- Eq. (1)-(3)

@pytest.mark.parametrize("fused", [True, False])   # bitlinear.FUSED: both forms of the equation
def test_weight_quant_hand_example(fused, monkeypatch):
    monkeypatch.setattr(bitlinear, "FUSED", fused)
    w = torch.tensor([[0.4, -0.05, 1.0], [-0.8, 0.2, -0.35]])
    delta = (0.4 + 0.05 + 1.0 + 0.8 + 0.2 + 0.35) / 6      # mean|W| = 0.4666...
    codes, d = weight_quant_int(w)
    # W/Δ = [0.857, -0.107, 2.143; -1.714, 0.429, -0.75] -> round -> clip to [-1, 1]
    assert torch.equal(codes, torch.tensor([[1, 0, 1], [-1, 0, -1]], dtype=torch.int8))
    assert abs(d.item() - delta) < 1e-7
    assert torch.allclose(weight_quant(w), delta * codes.float())


@pytest.mark.parametrize("fused", [True, False])   # bitlinear.FUSED: both forms of the equation
def test_activation_quant_hand_example(fused, monkeypatch):
    monkeypatch.setattr(bitlinear, "FUSED", fused)
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.01, -0.6]])
    q, g = activation_quant_int(x)
    # token 0: γ=1, 127/(1+ε)·x = [63.4994, -126.9987, 31.7497] -> [63, -127, 32]  (ε pushes 63.5 down)
    # token 1: γ=2, 127/(2+ε)·x = [126.9994, 0.635, -38.0998] -> [127, 1, -38]
    assert torch.equal(q, torch.tensor([[63, -127, 32], [127, 1, -38]], dtype=torch.int8))
    assert torch.allclose(g, torch.tensor([[1.0], [2.0]]))
    assert torch.allclose(activation_quant(x), q.float() * g / 127)
    assert torch.equal(round_clip(torch.tensor([-300.0, 300.0]), -128, 127), torch.tensor([-128.0, 127.0]))


def test_ste_gradients_are_identity():
    torch.manual_seed(0)
    bl = BitLinear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    y = bl(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    wq, xq = weight_quant(bl.weight.detach()), activation_quant(x.detach())
    assert torch.equal(y, F.linear(xq, wq))     # the forward is Q(x), Q(W) exactly
    # STE: d/dW of F.linear(x_q, W_q) with dQ/dW = 1 -> gy^T x_q ; d/dx -> gy W_q
    assert torch.allclose(bl.weight.grad, gy.t() @ xq, atol=1e-5)
    assert torch.allclose(x.grad, gy @ wq, atol=1e-5)


def test_integer_form_equals_fake_quant():
    torch.manual_seed(0)
    x, w = torch.randn(5, 37), torch.randn(11, 37)
    assert torch.allclose(bitlinear_int_reference(x, w), F.linear(activation_quant(x), weight_quant(w)),
                          atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- Eq. (4)-(5)

def test_subln_placement_and_strict_round_trip(tmp_path):
    _, path = make_hf(tmp_path, "qwen3")
    m = convert_to_bitnet(Qwen3.from_pretrained(path), subln=True)
    c = m.config
    for blk in m.model.layers:
        for mod in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj,
                    blk.self_attn.o_proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj):
            assert type(mod) is BitLinear
        assert isinstance(blk.self_attn.subln, SubLN) and blk.self_attn.subln.weight.shape == (c.num_attention_heads * c.head_dim,)
        assert isinstance(blk.mlp.subln, SubLN) and blk.mlp.subln.weight.shape == (c.intermediate_size,)
        assert type(blk.input_layernorm) is model_mod.RMSNorm  # existing norms untouched
    assert type(m.lm_head) is torch.nn.Linear and type(m.model.embed_tokens) is torch.nn.Embedding
    # SubLN sits right before o_proj / down_proj: the projection's input is normalised
    seen = {}
    blk = m.model.layers[0]
    blk.self_attn.o_proj.register_forward_hook(lambda mod, i, o: seen.update(o=i[0]))  # returns None
    blk.mlp.down_proj.register_forward_hook(lambda mod, i, o: seen.update(d=i[0]))
    with torch.no_grad():
        m(torch.randint(0, 256, (1, 9)))
    for key, norm in (("o", blk.self_attn.subln), ("d", blk.mlp.subln)):
        rms = seen[key].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)  # SubLN weights start at 1
    # strict save / load round trip of the converted model
    torch.save({"config": c.to_dict(), "model": m.state_dict()}, tmp_path / "ck.pt")
    m2 = load_model(str(tmp_path / "ck.pt"))
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(m(idx), m2(idx))


def test_without_subln_only_linears_change(tmp_path):
    _, path = make_hf(tmp_path, "qwen3")
    ref = Qwen3.from_pretrained(path)
    m = convert_to_bitnet(Qwen3.from_pretrained(path), subln=False)
    assert type(m.model.layers[0].self_attn.subln) is torch.nn.Identity
    assert set(m.state_dict()) == set(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    m2 = build_model(Qwen3Config.from_dict(m.config.to_dict()))
    m2.load_state_dict(m.state_dict(), strict=True)


# ----------------------------------------------------------------------------- clear errors

def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        Qwen3.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="Hugging Face hub"):  # offline here
        Qwen3.from_pretrained("no-such-org-bitdistill/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3.from_pretrained(str(tmp_path / "empty"))
    _, path = make_hf(tmp_path, "qwen3")
    cfg = json.load(open(os.path.join(path, "config.json")))
    bad = tmp_path / "llama"
    bad.mkdir()
    json.dump(dict(cfg, model_type="gemma3"), open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported model_type .gemma3."):
        Qwen3.from_pretrained(str(bad))
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Qwen3.from_pretrained(str(bad))
    # a config.json from another model size: shape mismatch, named
    os.replace(os.path.join(path, "config.json"), tmp_path / "c.json")
    json.dump(dict(cfg, intermediate_size=80), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="shape mismatch for model.layers.0.mlp.gate_proj.weight"):
        Qwen3.from_pretrained(path)
    # a config.json that claims qwen2 (q/k/v bias) for a qwen3 checkpoint: missing keys, named
    json.dump(dict(cfg, model_type="qwen2"), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="missing.*q_proj.bias"):
        Qwen3.from_pretrained(path)
    with pytest.raises(ValueError, match="not a bitdistill checkpoint"):
        torch.save({"weights": 1}, tmp_path / "x.pt")
        load_model(str(tmp_path / "x.pt"))
    m = Qwen3(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


# ----------------------------------------------------------------------------- Eq. (10)'s states, the layout

def test_qkv_of_one_layer_equal_transformers_states(tmp_path):
    # forward(qkv_layer=i) returns the Q, K, V that Eq. (10) distils: after q/k-norm, before RoPE and
    # the GQA repeat; checked against hooks on transformers' own modules, and no state stays behind
    hf, path = make_hf(tmp_path, "qwen3", False, 4, 2)
    ours = Qwen3.from_pretrained(path).eval()
    idx = torch.randint(0, 256, (2, 10))
    B, T, hd = 2, 10, 16
    got, attn = {}, hf.model.layers[1].self_attn
    hooks = [attn.q_norm.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
             attn.k_norm.register_forward_hook(lambda m, i, o: got.__setitem__("k", o)),
             attn.v_proj.register_forward_hook(lambda m, i, o: got.__setitem__("v", o.view(B, T, -1, hd)))]
    with torch.no_grad():
        hf(idx)
        logits, qkv = ours(idx, qkv_layer=1, qk_after_rope=False)          # the paper's reading
        assert torch.equal(logits, ours(idx))
    for h in hooks:
        h.remove()
    for name, x in zip("qkv", qkv):
        torch.testing.assert_close(x, got[name].transpose(1, 2), rtol=1e-5, atol=1e-5)   # (B, heads, T, hd)
    assert [tuple(x.shape) for x in qkv] == [(B, 4, T, hd), (B, 2, T, hd), (B, 2, T, hd)]
    assert not any(torch.is_tensor(v) for m in ours.modules() for v in vars(m).values())


def test_qkv_after_rope_are_what_enters_attention(tmp_path, monkeypatch):
    # the authors' capture point (recipe item qk_capture): Q and K after RoPE, K/V before the GQA repeat,
    # i.e. exactly what layer 1's attention multiplies (its K/V are the repeated ones)
    _, path = make_hf(tmp_path, "qwen3", False, 4, 2)
    ours = Qwen3.from_pretrained(path).eval()
    idx = torch.randint(0, 256, (2, 10))
    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q, k, v)) or real(q, k, v, **kw))
    with torch.no_grad():
        _, (q, k, v) = ours(idx, qkv_layer=1)                          # default: after RoPE
        _, (q0, k0, _) = ours(idx, qkv_layer=1, qk_after_rope=False)
    sq, sk, sv = seen[1]                                                # layer 1 of the first forward
    assert torch.equal(q, sq) and torch.equal(k.repeat_interleave(2, dim=1), sk)
    assert torch.equal(v.repeat_interleave(2, dim=1), sv)
    assert (q - q0).abs().max() > 1e-2 and (k - k0).abs().max() > 1e-2   # RoPE really moved them


SCRIPTS = {"continue_train", "distill", "toy", "bench"}   # commands; everything else is a library module


def test_layout_stage_scripts_are_leaves():
    """The structure the README describes: the two stages share only library modules, no library
    imports a script, every function stays readable (< 100 lines). A file holds one concept, at
    whatever length that concept takes."""
    import ast
    import glob
    here = os.path.dirname(os.path.abspath(__file__))
    imports = {}
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        name = os.path.basename(path)[:-3]
        with open(path, encoding="utf-8") as f:
            src = f.read()
        tree = ast.parse(src)
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module.split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 100, f"{name}.{node.name} is {node.end_lineno - node.lineno + 1} lines"
        imports[name] = mods
    assert "distill" not in imports["continue_train"] and "continue_train" not in imports["distill"]
    for name, mods in imports.items():
        if name not in SCRIPTS and not name.startswith("test_"):
            assert not mods & SCRIPTS, f"library module {name}.py imports the script(s) {mods & SCRIPTS}"


def test_unpadded_batches_take_the_fused_causal_path():
    """attention_mask None (stage 2's packed blocks, no padding): SDPA runs plain causal with no mask
    tensor (the fused kernels' case); the result equals the explicit causal mask's, with and
    without a cache, and with one cached new token."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Qwen3(cfg).eval()
    idx = torch.randint(0, 97, (2, 12))
    calls, real = [], F.scaled_dot_product_attention
    def spy(*a, **kw):
        calls.append((kw.get("attn_mask") is None, kw.get("is_causal")))
        return real(*a, **kw)
    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            fused = model(idx)
            masked = model(idx, attention_mask=torch.ones(2, 12, dtype=torch.long))
    finally:
        F.scaled_dot_product_attention = real
    assert calls[0] == (True, True) and calls[-1] == (False, False)
    torch.testing.assert_close(fused, masked, rtol=1e-5, atol=1e-5)
    cache = model.new_cache(2, 13)
    with torch.no_grad():
        parts = torch.cat([model(idx[:, :7], cache=cache), model(idx[:, 7:], cache=cache)], 1)
        step = model(idx[:, :1], cache=cache)                  # one new token after 12 cached
        full = model(torch.cat([idx, idx[:, :1]], 1))
    torch.testing.assert_close(parts, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
