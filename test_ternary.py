"""
Tests of the packed ternary CPU path: ternary_cpu.c against the PyTorch integer reference
(bitlinear.py), every SIMD path against plain C, and the packed model against the fake-quantized one.

    BITDISTILL_DATA=../shared/data python -m pytest -q test_ternary.py

Builds the C extension on first use (build_ffi.py) and needs no data or network.
"""
import os
import threading
import time

import pytest
import torch

import ckernels
import packed as P
from bitlinear import activation_quant_int, bitlinear_int_reference, weight_quant_int
from model import Qwen3, Qwen3Config
from subln import convert_to_bitnet

LIB = ckernels.lib()[0]
PATHS = list(range(LIB.tl_cpu_path() + 1))  # plain C, and every SIMD path this CPU has
SHAPES = [(1, 1, 1), (1, 7, 3), (3, 255, 17), (4, 256, 4), (5, 257, 9), (1, 1024, 129),
          (13, 1000, 31), (33, 513, 66), (2, 3072, 5)]


def ternary_case(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g) * 3
    x[0, 0] = 0.5  # a value that lands on a .5 boundary for some γ: rounding must match torch
    return x, w


def test_build_reports_path():
    import build_ffi
    line = build_ffi.describe(LIB)
    assert "SIMD path" in line and LIB.tl_padded_k(1) == 256 and LIB.tl_padded_k(257) == 512
    # the ISA peak bench.py divides by: a rate for each SIMD path, none for plain C, -1 for a bad path
    assert LIB.tl_peak_gmacs(0, 1, 1000) == 0 and LIB.tl_peak_gmacs(7, 1, 1000) == -1
    assert all(LIB.tl_peak_gmacs(p, 1, 100000) > 1 for p in PATHS[1:])


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_quantize_equals_torch(M, K, N):
    x, _ = ternary_case(M, K, N)
    q_ref, gamma = activation_quant_int(x)
    for path in PATHS:
        q, srow, qsum = ckernels.quantize(x, path=path)
        assert torch.equal(q[:, :K], q_ref) and not q[:, K:].any()
        assert torch.equal(srow, (gamma / 127.0)[:, 0])
        assert torch.equal(qsum, q_ref.sum(1, dtype=torch.int32))


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_ternary_kernel_equals_reference(M, K, N):
    x, w = ternary_case(M, K, N)
    codes, delta = weight_quant_int(w)
    packed = ckernels.pack_ternary(codes)
    q, _, qsum = ckernels.quantize(x)
    acc_ref = q[:, :K].int() @ codes.int().t()          # int32, exact
    y_ref = bitlinear_int_reference(x, w)               # ((float)acc * γ/127) * Δ
    scale = delta.expand(N).contiguous()
    for path in PATHS:
        for threads in (1, 2):
            assert torch.equal(ckernels.ternary_gemm_int(q, qsum, packed, path, threads), acc_ref), (path, threads)
            assert torch.equal(ckernels.ternary_linear(x, packed, scale, K, path, threads), y_ref), (path, threads)


@pytest.mark.parametrize("method", ["absmean", "gptq", "perchannel", "awq"])
def test_ternary_kernel_per_row_scales_and_clamp(method):
    """Table 4's quantizers with one scale per row (bitlinear.weight_quant_int), and Eq. (3)'s clamp form
    (TL_QUANT_CLAMP), on every path: equal to the PyTorch integer reference; block is refused."""
    M, K, N = 5, 300, 24
    x, w = ternary_case(M, K, N)
    x[1] *= 1e-7                                             # a token with max|x| below ε: the forms differ
    w[3] *= 5.0                                              # an "important" row for awq
    codes, delta = weight_quant_int(w, method, "clamp")
    packed, scale = ckernels.pack_ternary(codes), delta.float().reshape(-1).expand(N).contiguous()
    y_ref = bitlinear_int_reference(x, w, method, "clamp")
    for path in PATHS:
        assert torch.equal(ckernels.ternary_linear(x, packed, scale, K, path, 2, clamp=True), y_ref), (method, path)
    assert not torch.equal(ckernels.ternary_linear(x, packed, scale, K), y_ref)    # the add form is another kernel
    with pytest.raises(ValueError, match="one scale per row"):
        bitlinear_int_reference(x, w, "block", "clamp")
    model = tiny_bitnet(weight_quant="block", quant_eps="clamp")
    with pytest.raises(ValueError, match="one scale per row"):
        P.PackedQwen3.from_bitnet(model, "int8")


def test_ternary_extremes_and_full_int8_range():
    """Saturation traps: every code +1 or -1 with q = -128 / 127 everywhere, and random q over the
    whole int8 range (-128 included) through the integer entry point."""
    K, N = 3072, 8
    codes = torch.ones(N, K, dtype=torch.int8)
    codes[N // 2:] = -1
    q = torch.full((3, K), 127, dtype=torch.int8)
    q[1] = -128
    q[2] = torch.randint(-128, 128, (K,), dtype=torch.int8)
    ref = q.int() @ codes.int().t()
    packed = ckernels.pack_ternary(codes)
    for path in PATHS:
        assert torch.equal(ckernels.ternary_gemm_int(q, q.sum(1, dtype=torch.int32), packed, path), ref)


@pytest.mark.parametrize("M,K,N", [(1, 1024, 37), (6, 300, 70), (17, 2048, 9)])
def test_int8_kernel_equals_reference(M, K, N):
    g = torch.Generator().manual_seed(1)
    Kp = ckernels.padded_k(K)
    w8 = torch.zeros(N, Kp, dtype=torch.int8)
    w8[:, :K] = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    wsum = w8.sum(1, dtype=torch.int32)
    x = torch.randn(M, K, generator=g)
    q, srow, _ = ckernels.quantize(x)
    acc_ref = q.int() @ w8.int().t()
    scale = torch.rand(N, generator=g)
    y_ref = acc_ref.float() * srow[:, None] * scale
    for path in PATHS:
        for threads in (1, 2):
            assert torch.equal(ckernels.int8_gemm_int(q, w8, wsum, path, threads), acc_ref)
            assert torch.equal(ckernels.int8_linear(x, w8, wsum, scale, K, path, threads), y_ref)


@pytest.mark.parametrize("M,K,N", [(1, 1024, 300), (3, 77, 10), (2, 16, 5)])
def test_bf16_head_kernel(M, K, N):
    g = torch.Generator().manual_seed(9)
    w16 = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g)
    y0 = ckernels.bf16_linear(x, w16, path=0)
    assert torch.allclose(y0, x @ w16.float().t(), rtol=1e-4, atol=1e-4)
    for path in PATHS[1:]:
        for threads in (1, 2):
            assert torch.equal(ckernels.bf16_linear(x, w16, path=path, threads=threads), y0)


def test_simd_equals_plain_c_large():
    x, w = ternary_case(64, 1024, 3072 + 3, seed=2)
    codes, delta = weight_quant_int(w)
    packed, scale = ckernels.pack_ternary(codes), delta.expand(w.shape[0]).contiguous()
    y0 = ckernels.ternary_linear(x, packed, scale, 1024, path=0)
    for path in PATHS[1:]:
        assert torch.equal(ckernels.ternary_linear(x, packed, scale, 1024, path=path), y0)


PATH_NAMES = {1: "AVX2", 2: "AVX-512 VNNI"}   # every SIMD path ternary_cpu.c has


@pytest.mark.parametrize("path", sorted(PATH_NAMES))
def test_simd_path_equals_plain_c_on_1000_random_shapes(path):
    """Every kernel of a SIMD path (quantize, ternary and int8 products as exact int32 and as fp32,
    bf16 head, decode attention) equals the plain C bit for bit on 1,000 random shapes, odd sizes
    included. A path this CPU lacks is reported as a skip that names it."""
    if path > LIB.tl_cpu_path():
        pytest.skip(f"this CPU lacks the {PATH_NAMES[path]} path: not checked on this machine")
    g = torch.Generator().manual_seed(100 + path)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    for i in range(1000):
        M, K, N = rnd(1, 9), rnd(1, 1100), rnd(1, 40)
        threads = 1 + i % 2
        x = torch.randn(M, K, generator=g) * 4
        q0 = ckernels.quantize(x, 0)
        assert all(torch.equal(a, b) for a, b in zip(ckernels.quantize(x, path, threads), q0)), (M, K)
        q, qsum = torch.randint(-128, 128, (M, ckernels.padded_k(K)), dtype=torch.int8, generator=g), None
        q[:, K:] = 0
        qsum = q.sum(1, dtype=torch.int32)
        packed = ckernels.pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g))
        assert torch.equal(ckernels.ternary_gemm_int(q, qsum, packed, path, threads),
                           ckernels.ternary_gemm_int(q, qsum, packed, 0)), (M, K, N)
        scale = torch.rand(N, generator=g)
        assert torch.equal(ckernels.ternary_linear(x, packed, scale, K, path, threads),
                           ckernels.ternary_linear(x, packed, scale, K, 0)), (M, K, N)
        w8 = torch.zeros(N, ckernels.padded_k(K), dtype=torch.int8)
        w8[:, :K] = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        wsum = w8.sum(1, dtype=torch.int32)
        q[q == -128] = -127   # the quantizer never gives -128 (top of ternary_cpu.c)
        assert torch.equal(ckernels.int8_gemm_int(q, w8, wsum, path, threads), ckernels.int8_gemm_int(q, w8, wsum, 0))
        w16 = torch.randn(N, K, generator=g).bfloat16()
        assert torch.equal(ckernels.bf16_linear(x, w16, path, threads), ckernels.bf16_linear(x, w16, 0))
        hd, n_kv = 2 * rnd(1, 80), rnd(1, 3)
        n_q, max_len = n_kv * rnd(1, 3), rnd(1, 40)
        qv, kc, vc = torch.randn(n_q * hd, generator=g), torch.randn(n_kv, max_len, hd, generator=g).half(), \
            torch.randn(n_kv, max_len, hd, generator=g).half()
        n = rnd(1, max_len)
        assert torch.equal(ckernels.decode_attention(qv, kc, vc, n, path, threads),
                           ckernels.decode_attention(qv, kc, vc, n, 0)), (n_q, n_kv, hd, n)


@pytest.mark.parametrize("N,K", [(1, 1), (3, 5), (7, 300), (2, 512), (5, 1023)])
def test_pack_unpack_round_trip(N, K):
    codes = torch.randint(-1, 2, (N, K), dtype=torch.int8)
    packed = ckernels.pack_ternary(codes)
    assert packed.shape == (N, ckernels.padded_k(K) // 4) and packed.dtype == torch.uint8
    assert torch.equal(ckernels.unpack_ternary(packed, K), codes)
    # padding weights are code 0 (u = 1): unpacking the padded width gives zeros there
    assert not ckernels.unpack_ternary(packed, ckernels.padded_k(K))[:, K:].any()


def test_layout_is_the_documented_one():
    """Weight k sits in byte (k//256)*64 + k%64, bits 2*((k%256)//64), stored as code+1."""
    K = 512
    codes = torch.zeros(1, K, dtype=torch.int8)
    codes[0, 256 + 128 + 5] = 1                       # block 1, bits 4-5 of byte 5
    packed = ckernels.pack_ternary(codes)
    expect = torch.full((K // 4,), 0x55, dtype=torch.uint8)
    expect[64 + 5] = 0x55 & ~(3 << 4) | (2 << 4)
    assert torch.equal(packed[0], expect)


def test_clear_errors():
    K, N = 300, 10
    packed = ckernels.pack_ternary(torch.zeros(N, K, dtype=torch.int8))
    scale = torch.ones(N)
    with pytest.raises(ValueError, match="-1, 0 and"):
        ckernels.pack_ternary(torch.full((2, 3), 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="float32"):
        ckernels.ternary_linear(torch.randn(2, K, dtype=torch.float64), packed, scale, K)
    with pytest.raises(TypeError, match="int8"):
        ckernels.pack_ternary(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        ckernels.ternary_linear(torch.randn(K, 2).t(), packed, scale, K)
    with pytest.raises(ValueError, match="expects K"):
        ckernels.ternary_linear(torch.randn(2, K - 1), packed, scale, K)
    with pytest.raises(ValueError, match="bytes per row"):
        ckernels.ternary_linear(torch.randn(2, 1000), packed, scale, 1000)
    with pytest.raises(ValueError, match="one per output row"):
        ckernels.ternary_linear(torch.randn(2, K), packed, torch.ones(N + 1), K)
    with pytest.raises(ValueError, match="2 dims"):
        ckernels.ternary_linear(torch.randn(1, 2, K), packed, scale, K)
    lin = P.PackedLinear(K, N)                     # the module checks its input as strictly
    with pytest.raises(TypeError, match="float32"):
        lin(torch.randn(3, K, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expects 300"):
        lin(torch.randn(3, K + 2))
    with pytest.raises(ValueError, match="contiguous"):
        lin(torch.randn(3, 2 * K)[:, ::2])
    if LIB.tl_cpu_path() < 2:
        with pytest.raises(RuntimeError, match="SIMD path"):
            ckernels.ternary_linear(torch.randn(2, K), packed, scale, K, path=2)


def test_fused_pre_ops_match_torch():
    """RMSNorm and silu(gate)·up fused in front of the kernel, read back through an identity weight
    (codes = I, Δ = 1, so y = γ/127 · q of the pre-op output): equal to PyTorch's up to a rare
    one-step int8 rounding difference (the C norm sums in another order)."""
    from model import RMSNorm
    K, M = 300, 16
    g = torch.Generator().manual_seed(7)
    packed, scale = ckernels.pack_ternary(torch.eye(K, dtype=torch.int8)), torch.ones(K)
    norm = RMSNorm(K, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(K, generator=g))
    gate_up = torch.randn(M, 2 * K, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    for x, swiglu, h in ((gate, False, norm(gate)), (gate_up, True, norm(torch.nn.functional.silu(gate) * up))):
        y = ckernels.ternary_linear(x.contiguous(), packed, scale, K, norm_weight=norm.weight.detach(), eps=1e-6, swiglu=swiglu)
        q, gamma = activation_quant_int(h.detach())
        y_ref = q.float() * (gamma / 127.0)
        step = (gamma / 127.0).expand_as(y)
        assert ((y - y_ref).abs() <= step * 1.01).all() and ((y - y_ref).abs() > 1e-6).float().mean() < 0.01


def test_qk_norm_rope_matches_model():
    from model import RMSNorm, apply_rope, rope_cos_sin
    B, T, nh, nkv, hd = 2, 5, 4, 2, 16
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(B * T, (nh + 2 * nkv) * hd, generator=g)
    qn, kn = RMSNorm(hd), RMSNorm(hd)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.2 * torch.randn(hd, generator=g))
        kn.weight.copy_(1 + 0.2 * torch.randn(hd, generator=g))
    cos, sin = rope_cos_sin(torch.arange(3, 3 + T)[None].expand(B, T), hd, 1e6)       # (B, T, hd)
    x = qkv.view(B, T, nh + 2 * nkv, hd).transpose(1, 2)                             # (B, h, T, hd)
    with torch.no_grad():
        q_ref = apply_rope(qn(x[:, :nh]), cos, sin)
        k_ref = apply_rope(kn(x[:, nh:nh + nkv]), cos, sin)
    v_ref = x[:, nh + nkv:].clone()
    out = ckernels.qk_norm_rope(qkv.clone(), nh, nkv, hd, qn.weight.detach(), kn.weight.detach(), 1e-6,
                         cos.reshape(B * T, hd).contiguous(), sin.reshape(B * T, hd).contiguous())
    o = out.view(B, T, nh + 2 * nkv, hd).transpose(1, 2)
    assert torch.allclose(o[:, :nh], q_ref, atol=1e-5) and torch.allclose(o[:, nh:nh + nkv], k_ref, atol=1e-5)
    assert torch.equal(o[:, nh + nkv:], v_ref)


def test_gil_is_released():
    """A long C call in a thread must not stop Python from running in the main thread."""
    K, N = 3072, 3072
    x = torch.randn(32, K)
    packed = ckernels.pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8))
    t = threading.Thread(target=ckernels.ternary_linear, args=(x, packed, torch.ones(N), K, 0, 1))
    count, t0 = 0, time.perf_counter()
    t.start()
    while t.is_alive():
        count += 1
    assert count > 1000, f"main thread ran only {count} loop iterations during the C call"
    assert time.perf_counter() - t0 > 0.01


# ---------------------------------------------------------------------------------------------
# The packed model against the fake-quantized one

def tiny_bitnet(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg.update(kw)
    subln, subln_all = cfg.pop("subln", True), cfg.pop("subln_all", False)
    quant = dict(weight_quant=cfg.pop("weight_quant", "absmean"), quant_eps=cfg.pop("quant_eps", "add"))
    model = convert_to_bitnet(Qwen3(Qwen3Config(**cfg)), subln=subln, subln_all=subln_all, **quant).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so copying them is tested
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kw", [dict(), dict(subln=False, tie_word_embeddings=False),
                                dict(qkv_bias=True, qk_norm=False, num_key_value_heads=1),
                                dict(subln_all=True), dict(subln_all=True, qkv_bias=True),
                                dict(quant_eps="clamp"), dict(weight_quant="perchannel", quant_eps="clamp"),
                                dict(weight_quant="awq", quant_eps="clamp", subln_all=True)])
def test_packed_model_equals_fake_quantized(kw, one_thread):
    model = tiny_bitnet(**kw)
    pm = P.PackedQwen3.from_bitnet(model, head="fp32")
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = model(idx)
    got = pm(idx)
    # Not bit-equal: the fake-quantized F.linear sums its fp32 products in another order than the
    # exact int32 kernel (~1e-7 apart), and a value that lands within that of a .5 boundary
    # rounds to a neighbouring int8 in the next layer's Eq. (3). One such flip moves this tiny
    # model's logits by ~0.3% of their range (seen with the third config), hence 2%.
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert torch.equal(pm.generate(idx, 24), model.generate(idx, 24))
    if model.config.subln_all:   # five linears with their own SubLN, and a save/load round trip
        assert len(pm.layers[0].qkv_parts) == 3 and not hasattr(pm.layers[0], "qkv")
        a, m = model.model.layers[1].self_attn, model.model.layers[1].mlp
        lins = (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
        assert all(torch.equal(n.weight, l.in_norm.weight) for n, l in zip(pm.layers[1].in_norms, lins))


def test_packed_model_heads_and_threads():
    model = tiny_bitnet(seed=3)
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(idx, last_only=True)
    for head, tol in (("bf16", 0.05), ("int8", 0.05)):
        got = P.PackedQwen3.from_bitnet(model, head)(idx, last_only=True)
        assert (got - ref).abs().max() <= tol * ref.abs().max(), head
    pm = P.PackedQwen3.from_bitnet(model, "int8")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pm.generate(idx, 10)
        torch.set_num_threads(2)
        two = pm.generate(idx, 10)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_prefill_then_decode_equals_one_pass(one_thread):
    """Cache correctness: logits of a 2-chunk prefill + decode equal one pass over all tokens."""
    pm = P.PackedQwen3.from_bitnet(tiny_bitnet(seed=4), "fp32")
    idx = torch.randint(0, 300, (1, 10))
    full = pm(idx)
    cache = pm.new_cache(1, 10)
    parts = [pm(idx[:, :6], cache), pm(idx[:, 6:9], cache), pm(idx[:, 9:], cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_save_load_two_bits_per_weight(tmp_path, one_thread):
    model = tiny_bitnet(seed=5, hidden_size=256, intermediate_size=512, head_dim=64, quant_eps="clamp")
    pm = P.PackedQwen3.from_bitnet(model, "int8")
    path = tmp_path / "packed.pt"
    pm.save(path)
    pm2 = P.PackedQwen3.load(path)
    kernels = [m for m in pm2.modules() if isinstance(m, (P.PackedLinear, P.Int8Linear))]
    assert kernels and all(m.clamp for m in kernels)            # Eq. (3)'s ε form comes back from the config
    idx = torch.randint(0, 300, (1, 5))
    assert torch.equal(pm2.generate(idx, 8), pm.generate(idx, 8))
    sd = torch.load(path, weights_only=True)["state_dict"]
    n_weights = sum(l.weight.numel() for blk in model.model.layers
                    for l in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj,
                              blk.self_attn.o_proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj))
    packed_bytes = sum(v.numel() for k, v in sd.items() if k.endswith(".packed"))
    assert all(v.dtype == torch.uint8 for k, v in sd.items() if k.endswith(".packed"))
    assert packed_bytes * 8 == 2 * n_weights  # K = 256 / 512: no padding, exactly 2 bits each
    with pytest.raises(ValueError, match="not a packed model"):
        torch.save({"model": {}}, tmp_path / "x.pt")
        P.PackedQwen3.load(tmp_path / "x.pt")


def test_readme_bench_tables_are_results_bench_json(capsys):
    # every row of docs/speed.md's benchmark tables (two geometries: backends, decode split, kernels) and every goal
    # line is what `python bench.py --report results/bench.json` prints from the committed file:
    # a stale figure fails
    from figures import load_results, print_report
    here = os.path.dirname(os.path.abspath(__file__))
    print_report(load_results(os.path.join(here, "results", "bench.json")))
    out = capsys.readouterr().out.splitlines()
    rows = [l for l in out if l.startswith("| ") and not l.startswith(("| backend", "| kernel"))]
    goals = [l for l in out if l.startswith("  [")]
    with open(os.path.join(here, "docs", "speed.md"), encoding="utf-8") as f:
        doc = f.read()
    assert len(rows) == 2 * (5 + 4 + 20) and len(goals) == 5 and all(r in doc for r in rows + goals)
