"""
Tests of the one-call C decode step (decode_cpu.c) and the decode attention it shares with the
PyTorch forward of packed.py: bit for bit against that forward on Qwen3-0.6B's geometry and on
small variants, greedy tokens against the fake-quantized model, attention against PyTorch's SDPA.
The kernels under it are tested in test_ternary.py.

    BITDISTILL_DATA=../shared/data python -m pytest -q test_decode.py
"""
import pytest
import torch

import ckernels
import packed as P
from test_ternary import tiny_bitnet


def test_decode_attention_equals_sdpa():
    """tl_attention (the attention of a decode token, C step and PyTorch forward alike) against
    PyTorch's scaled_dot_product_attention with grouped-query heads, within fp32 rounding."""
    g = torch.Generator().manual_seed(11)
    for n_q, n_kv, hd, max_len, n in ((16, 8, 128, 40, 33), (4, 1, 16, 5, 1), (6, 3, 34, 9, 9)):
        q, kc, vc = torch.randn(n_q * hd, generator=g), torch.randn(n_kv, max_len, hd, generator=g).half(), \
            torch.randn(n_kv, max_len, hd, generator=g).half()        # the cache holds fp16
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.view(1, n_q, 1, hd), kc[None, :, :n].float(), vc[None, :, :n].float(), enable_gqa=True).reshape(-1)
        assert torch.allclose(ckernels.decode_attention(q, kc, vc, n), ref, atol=1e-5, rtol=1e-5), (n_q, n_kv, hd, n)


def test_fp16_conversions_equal_torch():
    """The KV cache's fp32 -> fp16 (written by the C step) rounds exactly as PyTorch's .half() (which
    the op-by-op forward uses), and fp16 -> fp32 is exact: normal, subnormal, overflowing, tie and
    signed-zero values, and every one of the 65,536 fp16 bit patterns back to fp32."""
    L, ffi = ckernels.lib()
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(100000, generator=g) * 10 ** torch.randint(-9, 6, (100000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 2.0 ** -24, 2.0 ** -25,
                                 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -12), float("inf"), 1.0 + 2.0 ** -11,
                                 1.0 + 3 * 2.0 ** -11])])
    h = torch.empty(x.numel(), dtype=torch.int16)
    L.tl_f32_to_f16(ffi.cast("float *", x.data_ptr()), x.numel(), ffi.cast("uint16_t *", h.data_ptr()))
    assert torch.equal(h, x.half().view(torch.int16))
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    back = torch.empty(65536)
    L.tl_f16_to_f32(ffi.cast("uint16_t *", every.data_ptr()), 65536, ffi.cast("float *", back.data_ptr()))
    ref = every.view(torch.float16).float()
    nan = ref.isnan()
    assert torch.equal(back[~nan], ref[~nan]) and back[nan].isnan().all()


def greedy_steps(pm, idx, steps, c_decode):
    """Greedy decode of `steps` tokens after the prompt idx (1, T): tokens and every step's logits."""
    pm.c_decode = c_decode
    cache = pm.new_cache(1, idx.shape[1] + steps)
    logits, toks, out = pm(idx, cache, last_only=True), [], []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)                            # (1, 1)
        toks.append(int(nxt))
        logits = pm(nxt, cache, last_only=True)
        out.append(logits[0, -1])
    return toks, torch.stack(out)


def assert_c_step_equals_forward(pm, idx, steps):
    """`steps` greedy tokens of the C step at 1 and 2 threads: the same tokens as the op-by-op
    PyTorch forward, and every step's logits equal bit for bit."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref_toks, ref = greedy_steps(pm, idx, steps, False)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            toks, got = greedy_steps(pm, idx, steps, True)
            assert toks == ref_toks and torch.equal(got, ref), threads
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("head", ["int8", "bf16"])
def test_c_decode_step_equals_pytorch_forward_qwen3_06b(head):
    """The one-call C decode step (decode_cpu.c) against the per-operation PyTorch forward of the
    same packed model on Qwen3-0.6B's geometry (random ternary weights, 28 layers): 64 greedy
    tokens identical, every step's logits equal bit for bit (the same kernels in the same order;
    attention is the shared tl_attention), at 1 and 2 threads."""
    import bench
    c = bench.qwen3_06b()
    pm = bench.random_packed(c, head)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in pm.modules():   # a different norm weight each, so that a wrong pointer shows
            if isinstance(mod, P.RMSNorm):
                mod.weight.uniform_(0.5, 1.5, generator=g)
    idx = torch.randint(0, c.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    assert_c_step_equals_forward(pm, idx, 64)
    lin, head_s, total = pm._step.timing
    assert 0 < lin < total and 0 < head_s < total


@pytest.mark.parametrize("kw", [dict(), dict(subln=False, tie_word_embeddings=False),
                                dict(qkv_bias=True, qk_norm=False, num_key_value_heads=1),
                                dict(subln_all=True), dict(subln_all=True, qkv_bias=True, tie_word_embeddings=False),
                                dict(subln_all=True, weight_quant="awq", quant_eps="clamp")])
def test_c_decode_step_on_small_models(kw, one_thread):
    """Variants the 0.6B test lacks (no SubLN, untied head, Qwen2's q/k/v bias without q/k norm,
    one KV head, and the authors' SubLN before all seven projections, the default recipe's layout):
    C step = PyTorch forward bit for bit; and, fed the C step's own greedy tokens, the fake-quantized
    model (fp32 head and cache) ranks each of them within 1% of its logit range of its own best: the
    packed model's int8 head and fp16 cache may flip a near-tie (one config here, by 0.26%), so
    this, not token equality, is the check against the independent reference."""
    model = tiny_bitnet(seed=6, **kw)
    pm = P.PackedQwen3.from_bitnet(model, "int8")
    idx = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    toks, got = greedy_steps(pm, idx, 24, True)
    ref_toks, ref = greedy_steps(pm, idx, 24, False)
    assert toks == ref_toks and torch.equal(got, ref)
    pm.c_decode = True
    seq = pm.generate(idx, 24)                                                 # (1, 29)
    with torch.no_grad():
        ref_logits = model(seq)[0, idx.shape[1] - 1:-1]                         # (24, V): the next token's
    picked = ref_logits.gather(1, seq[0, idx.shape[1]:, None])[:, 0]
    gap = (ref_logits.max(1).values - picked) / (ref_logits.max(1).values - ref_logits.min(1).values)
    assert gap.max() <= 0.01 and (gap == 0).float().mean() >= 0.9
