"""
The paper's equations, in the paper's order, each against an independent reference: Eq. (1)-(3)
and the STE on hand-computed examples (bitlinear.py), SubLN's place (Eq. 4-5, subln.py), the
attention and the model around it against Hugging Face transformers (Eq. 6, model.py; the oracle,
used only in tests), L_LD and L_CE against direct sums (Eq. 8-9, 14, losses.py), the states and the
relation loss against Algorithm 1 as printed (Eq. 10-12, attn_relation.py), and the total (Eq. 13).
The stage scripts, kernels, loaders and their errors have their own files (test_*.py).

    BITDISTILL_DATA=../shared/data python -m pytest -q
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import bitlinear
import distill
import losses
import model as model_mod
from attn_relation import algorithm1_reference, attention_relation_loss, relation_heads
from bitlinear import (BitLinear, activation_quant, activation_quant_int, bitlinear_int_reference,
                       weight_quant, weight_quant_int, round_clip)
from model import Qwen3, Qwen3Config, load_model
from subln import SubLN, build_model, convert_to_bitnet

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


# ----------------------------------------------------------------------------- Eq. (1)-(3): ternary weights, int8 activations, the STE (bitlinear.py)

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


# ----------------------------------------------------------------------------- Eq. (1)-(3) as the authors' code computes them: ε's clamp, Table 4's quantizers

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "authors_quantizers.json")


def fixture_base(N, K):
    """The fixture's inputs (fixtures/authors_quantizers.json, "inputs"), built the same way here."""
    import numpy as np
    i, j = np.arange(N)[:, None], np.arange(K)[None, :]
    w = (((i * 7919 + j * 104729) % 2001) - 1000) / 1000.0 * 0.05
    w = w * np.where(i == 3, 1e-4, 1.0) * np.where(i == 5, 0.0, 1.0) * (1.0 + (i == 6) * 2.0)
    return torch.from_numpy(w.astype(np.float32))


def fixture_expected(entry, w, method):
    """Q_w(W) of the authors' function from the fixture's codes and magnitudes."""
    N, K = w.shape
    codes = torch.tensor(["-0+".index(c) - 1 for c in entry["codes"]], dtype=torch.int8)
    mag = torch.tensor([0.0 if m is None else float.fromhex(m) for m in entry["magnitude"]])
    group = {"absmean": torch.zeros(N * K, dtype=torch.long), "gptq": torch.zeros(N * K, dtype=torch.long),
             "perchannel": torch.arange(N).repeat_interleave(K), "awq": torch.arange(N).repeat_interleave(K),
             "block": torch.arange(N * K) // 256}[method]
    return codes.view(N, K), (codes.float() * mag[group]).view(N, K)


@pytest.fixture(scope="module")
def authors():
    import json
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", bitlinear.WEIGHT_QUANTS)
def test_weight_quantizers_equal_the_authors_bit_for_bit(authors, method, fused, monkeypatch):
    """Each quantizer of Table 4 with the clamp form against the numbers the authors' core.py gave on
    the same tensors (a zero row, a row with mean |w| below ε, blocks across rows, K not a multiple of 256)."""
    monkeypatch.setattr(bitlinear, "FUSED", fused)
    for name, w in (("w", fixture_base(8, 300)), ("tiny", fixture_base(4, 64) * 1e-4)):
        codes, expected = fixture_expected(authors["weights"][f"{name}/{method}"], w, method)
        assert torch.equal(weight_quant(w, method, "clamp"), expected), (name, method)
        c, delta = weight_quant_int(w, method, "clamp")
        assert torch.equal(c, codes), (name, method)
        per = (bitlinear.as_blocks(torch.ones_like(w)) if method == "block" else torch.ones_like(w)) * (1 / delta)
        assert torch.equal(c.float() / (per.reshape(-1)[:w.numel()].view(w.shape)), expected), (name, method)


@pytest.mark.parametrize("fused", [True, False])
def test_activation_quant_clamp_equals_the_authors_bit_for_bit(authors, fused, monkeypatch):
    import ckernels
    monkeypatch.setattr(bitlinear, "FUSED", fused)
    x = fixture_base(6, 96) * 40.0
    x[2] = x[2] * 1e-7                                   # max|x| below ε
    x[4] = 0.0
    q = torch.tensor(authors["activations"]["codes"], dtype=torch.float32).view(6, 96)
    s = torch.tensor([float.fromhex(v) for v in authors["activations"]["multiplier"]]).view(6, 1)
    assert torch.equal(activation_quant(x, "clamp"), q / s)
    qi, gamma = activation_quant_int(x, "clamp")
    assert torch.equal(qi.float(), q) and torch.equal(127.0 / gamma, s)
    qc, srow, _ = ckernels.quantize(x, clamp=True)       # the C kernels' clamp form: the same codes
    assert torch.equal(qc[:, :96].float(), q) and torch.equal(srow, (gamma / 127.0)[:, 0])
    assert not torch.equal(activation_quant(x, "add"), q / s)      # the paper's ε gives other values here


def test_eps_forms_and_the_recipe():
    """add: Δ + ε (Eq. 1, 3); clamp: max(Δ, ε). Below ε the levels differ (±mean|w| against ±ε); on ordinary
    weights a few codes at the thresholds do; --recipe authors is clamp, --recipe paper add."""
    import continue_train
    from recipe import RECIPES
    w = torch.tensor([[9e-6, 1e-7, 1e-7, 1e-7]])        # mean|w| = 2.325e-6 < ε
    assert weight_quant(w, eps="add")[0, 0].item() == pytest.approx(w.abs().mean().item(), rel=1e-6)
    assert weight_quant(w, eps="clamp")[0, 0].item() == pytest.approx(1e-5, rel=1e-6)
    torch.manual_seed(0)
    big = torch.randn(1024, 1024) * 0.02
    differ = (weight_quant_int(big, eps="add")[0] != weight_quant_int(big, eps="clamp")[0]).float().mean().item()
    assert 0 < differ < 1e-3, differ
    assert (RECIPES["authors"]["quant_eps"], RECIPES["paper"]["quant_eps"]) == ("clamp", "add")
    for recipe, eps in (("authors", "clamp"), ("paper", "add")):
        args = continue_train.parse_args(["--recipe", recipe])
        assert args.quant_eps == eps
    m = convert_to_bitnet(Qwen3(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)),
                          weight_quant="awq", quant_eps="clamp")
    lin = m.model.layers[0].mlp.down_proj
    assert (lin.quantizer, lin.eps, m.config.weight_quant, m.config.quant_eps) == ("awq", "clamp", "awq", "clamp")
    x = torch.randn(3, lin.in_features)
    assert torch.equal(lin(x), F.linear(activation_quant(x, "clamp"), weight_quant(lin.weight, "awq", "clamp")))
    with pytest.raises(ValueError, match="exists only in the authors' code"):
        BitLinear(4, 4, quantizer="block", eps="add")


# ----------------------------------------------------------------------------- Eq. (4)-(5): SubLN (subln.py)

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


# ----------------------------------------------------------------------------- Eq. (6): attention, in the model it sits in, against transformers (model.py)

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


# ----------------------------------------------------------------------------- Eq. (7): L_CT (continue_train.py)

def test_eq7_continued_training_loss_against_a_loop():
    # -1/N Σ_i Σ_t log P(c_{i,t} | c_{i,<t}), written as a loop over sequences and positions; ours is
    # the same sum divided by the T positions of each packed block as well (a fixed rescaling)
    import continue_train
    torch.manual_seed(0)
    B, T, V = 3, 6, 11
    logits, targets = torch.randn(B, T, V) * 3, torch.randint(0, V, (B, T))
    row = lambda i, t: logits[i, t].tolist()                              # noqa: E731
    eq7 = -sum(math.log(math.exp(row(i, t)[targets[i, t]]) / sum(math.exp(v) for v in row(i, t)))
               for i in range(B) for t in range(T)) / B
    assert continue_train.next_token_loss(logits, targets).item() == pytest.approx(eq7 / T, rel=1e-6)


# ----------------------------------------------------------------------------- Eq. (8)-(9) and (14): L_LD and L_CE (losses.py)

def test_logits_distill_and_ce_against_direct_computation():
    torch.manual_seed(0)
    B, T, V, tau = 3, 6, 11, 5.0
    s_logits, t_logits = torch.randn(B, T, V) * 3, torch.randn(B, T, V) * 3
    idx = torch.randint(0, V, (B, T))
    answer = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 0]])
    kl, ce = 0.0, 0.0
    for b in range(B):
        for t in range(1, T):
            if answer[b, t]:   # logits at t-1 predict token t
                p = F.softmax(t_logits[b, t - 1] / tau, -1)
                q = F.softmax(s_logits[b, t - 1] / tau, -1)
                kl += sum(p[v] * math.log(p[v] / q[v]) for v in range(V))
                ce -= F.log_softmax(s_logits[b, t - 1], -1)[idx[b, t]]
    torch.testing.assert_close(losses.logits_distill_loss(s_logits, t_logits, answer, tau),
                               kl / B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.ce_loss(s_logits, idx, answer), ce / B, rtol=1e-5, atol=1e-6)
    assert losses.logits_distill_loss(t_logits, t_logits, answer, tau).abs().item() < 1e-6


def loop_kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) of two 1-D logit vectors, element by element."""
    p, q = F.softmax(p_logits.double(), -1), F.softmax(q_logits.double(), -1)
    return sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)))


def test_recipe_items_against_loops():
    # each authors'-code item on small tensors, against a loop written from its definition
    torch.manual_seed(2)
    B, T, V, tau = 2, 6, 5, 5.0
    s_logits, t_logits = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    idx = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])          # right padding
    answer = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    # L_LD, authors (items 3, 15): every position with mask 1, teacher and student at the same
    # position (no shift, the last real one included), mean over those positions, times τ²
    rows = [(b, i) for b in range(B) for i in range(T) if mask[b, i]]
    ref = sum(loop_kl(t_logits[b, i] / tau, s_logits[b, i] / tau) for b, i in rows) / len(rows) * tau ** 2
    got = losses.logits_distill_loss(s_logits, t_logits, mask, tau, form="authors")
    assert got.item() == pytest.approx(float(ref), rel=1e-5)
    # L_CE, authors (recipe item ce_form): the mean over the answer tokens of the batch
    nll = [-F.log_softmax(s_logits[b, i - 1].double(), -1)[idx[b, i]] for b in range(B) for i in range(1, T)
           if answer[b, i]]
    assert losses.ce_loss(s_logits, idx, answer, "token_mean").item() == pytest.approx(float(sum(nll) / len(nll)),
                                                                                       rel=1e-5)
    assert losses.ce_loss(s_logits, idx, answer, "sample_sum").item() == pytest.approx(float(sum(nll) / B), rel=1e-5)


# ----------------------------------------------------------------------------- Eq. (10): the states L_AD distils (model.py, qkv_layer)

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


# ----------------------------------------------------------------------------- Eq. (11)-(12), Algorithm 1: L_AD (attn_relation.py)

def random_qkv(B, L, n_head, n_kv, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, L, head_dim, generator=g, dtype=torch.float64).float()
            for n in (n_head, n_kv, n_kv)]


@pytest.mark.parametrize("s_shape,t_shape,split", [
    ((4, 4, 16), (4, 4, 16), 4),    # same shapes, no GQA
    ((4, 2, 16), (8, 2, 16), 4),    # GQA student, teacher with more query heads
    ((4, 2, 16), (8, 4, 32), 8),    # wider teacher: more heads and bigger head_dim
])
@pytest.mark.parametrize("scaled_dot,temperature", [(False, 1.0), (False, 0.5), (True, 1.0)])
def test_relation_loss_equals_algorithm1(s_shape, t_shape, split, scaled_dot, temperature):
    s = random_qkv(3, 11, *s_shape, seed=0)
    t = random_qkv(3, 11, *t_shape, seed=1)
    ours = attention_relation_loss(s, t, split, temperature=temperature, scaled_dot=scaled_dot, chunk_size=4)
    ref = algorithm1_reference(s, t, split, temperature=temperature, scaled_dot=scaled_dot)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.item() > 1e-3


def test_relation_loss_zero_for_identical_states():
    s = random_qkv(2, 9, 4, 2, 16, seed=0)
    assert attention_relation_loss(s, [x.clone() for x in s], 4).item() == pytest.approx(0.0, abs=1e-7)


def test_relation_loss_ignores_padding():
    B, L = 3, 10
    s, t = random_qkv(B, L, 4, 2, 8, seed=0), random_qkv(B, L, 8, 2, 8, seed=1)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 7:] = 0     # right padding
    mask[1, :4] = 0     # left padding
    loss = attention_relation_loss(s, t, 4, attention_mask=mask, chunk_size=3)
    # whatever sits under the mask does not matter ...
    pad = ~mask.bool()[:, None, :, None]
    s2 = [torch.where(pad, torch.randn_like(x) * 100, x) for x in s]
    t2 = [torch.where(pad, torch.randn_like(x) * 100, x) for x in t]
    torch.testing.assert_close(attention_relation_loss(s2, t2, 4, attention_mask=mask), loss)
    # ... and the batch loss is the mean of each sample's loss on its real tokens only (Eq. 11)
    per_sample = []
    for b in range(B):
        keep = mask[b].bool()
        per_sample.append(algorithm1_reference([x[b:b + 1, :, keep] for x in s],
                                               [x[b:b + 1, :, keep] for x in t], 4))
    torch.testing.assert_close(loss, torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-6)


def test_relation_loss_chunked_equals_unchunked_with_grads():
    s = [x.requires_grad_() for x in random_qkv(2, 13, 4, 2, 8, seed=0)]
    t = random_qkv(2, 13, 4, 2, 8, seed=1)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0
    grads = []
    for chunk in (1, 5, 13):
        loss = attention_relation_loss(s, t, 4, attention_mask=mask, chunk_size=chunk)
        grads.append(torch.autograd.grad(loss, s))
        if chunk == 1:
            first = loss.detach()
        torch.testing.assert_close(loss.detach(), first)
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b)


def test_relation_loss_fp32_under_autocast():
    s, t = random_qkv(2, 8, 4, 2, 16, seed=0), random_qkv(2, 8, 4, 2, 16, seed=1)
    ref = attention_relation_loss(s, t, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_relation_loss(s, t, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_relation_loss_errors():
    s, t = random_qkv(2, 8, 4, 2, 6, seed=0), random_qkv(2, 8, 4, 2, 6, seed=1)
    with pytest.raises(ValueError, match="does not divide"):
        attention_relation_loss(s, t, 5)                       # 4*6=24 and 2*6=12: 5 divides neither
    with pytest.raises(ValueError, match="does not divide"):
        attention_relation_loss(s, t, 24)                      # divides Q (24) but not K/V (12)
    with pytest.raises(ValueError, match="same tokens"):
        attention_relation_loss(s, random_qkv(2, 7, 4, 2, 6, seed=1), 4)
    with pytest.raises(ValueError, match="attention_mask"):
        attention_relation_loss(s, t, 4, attention_mask=torch.ones(2, 9))


def authors_ad_reference(s_qkv, t_qkv, split_heads, n_layers=1):
    """The authors' trainer, row by row: per Φ, the relation KL of every (sample, relation head,
    token) row, divided by B·A_r·L (batchmean), summed over Φ, then divided by layers x A_r."""
    total = 0.0
    for s, t in zip(s_qkv, t_qkv):
        B, L = s.shape[0], s.shape[2]
        rs, rt = relation_heads(s.double(), split_heads), relation_heads(t.double(), split_heads)  # (B, A_r, L, D)
        kl = 0.0
        for b in range(B):
            for a in range(split_heads):
                xs, xt = F.normalize(rs[b, a], dim=-1), F.normalize(rt[b, a], dim=-1)
                for i in range(L):
                    kl += loop_kl(xt[i] @ xt.T, xs[i] @ xs.T)
        total += kl / (B * split_heads * L)
    return total / (n_layers * split_heads)


def test_ad_authors_normalisation_against_a_loop():
    # recipe item ad_norm: at the same γ the authors' L_AD is A_r times smaller than Eq. (11) as printed
    s_qkv, t_qkv = random_qkv(2, 5, 4, 2, 8, seed=5), random_qkv(2, 5, 8, 4, 8, seed=6)
    ref = authors_ad_reference(s_qkv, t_qkv, 8)
    got = attention_relation_loss(s_qkv, t_qkv, 8, norm="authors")
    assert got.item() == pytest.approx(float(ref), rel=1e-5)
    assert attention_relation_loss(s_qkv, t_qkv, 8).item() == pytest.approx(8 * float(ref), rel=1e-5)


# ----------------------------------------------------------------------------- Eq. (13): L = L_CE + λ L_LD + γ L_AD (losses.distill_loss)

@pytest.mark.parametrize("recipe", ["paper", "authors"])
def test_eq13_total_is_ce_plus_lambda_ld_plus_gamma_ad(recipe):
    # Eq. (13) against its three parts computed by independent references: a dropped term, a
    # wrong weight or a sign flip changes the total by far more than the tolerance
    torch.manual_seed(1)
    B, T, V = 2, 5, 7
    s_logits, t_logits = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    idx, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.long)
    answer = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    s_qkv, t_qkv = random_qkv(B, T, 4, 2, 8, seed=3), random_qkv(B, T, 4, 2, 8, seed=4)
    args = distill.get_args(["--task", "sst2", "--lambda_ld", "3", "--gamma_ad", "70", "--recipe", recipe,
                             "--split_heads", "4"])
    ce = losses.ce_loss(s_logits, idx, answer, args.ce_form)            # pinned by the tests above
    if recipe == "paper":
        ld = losses.logits_distill_loss(s_logits, t_logits, answer, args.tau)   # pinned above
        ad = algorithm1_reference(s_qkv, t_qkv, 4)                               # Algorithm 1 as printed
    else:
        ld = losses.logits_distill_loss(s_logits, t_logits, mask, args.tau, "authors")
        ad = authors_ad_reference(s_qkv, t_qkv, 4)
    assert min(ce, 3 * ld, 70 * ad) > 0.05                                       # every term matters
    loss, terms = losses.distill_loss({"logits": s_logits, "qkv": s_qkv}, {"logits": t_logits, "qkv": t_qkv},
                                       idx, mask, answer, **distill.loss_settings(args))
    assert loss.item() == pytest.approx(float(ce + 3 * ld + 70 * ad), rel=1e-5)
    assert {k: float(v) for k, v in terms.items()} == pytest.approx({"ce": float(ce), "ld": float(ld), "ad": float(ad)},
                                                                    rel=1e-5)
    # a switched-off term (teacher output None) leaves the sum, and only it
    loss, terms = losses.distill_loss({"logits": s_logits, "qkv": s_qkv}, {"logits": None, "qkv": t_qkv},
                                       idx, mask, answer, **distill.loss_settings(args))
    assert loss.item() == pytest.approx(float(ce + 70 * ad), rel=1e-5) and set(terms) == {"ce", "ad"}
