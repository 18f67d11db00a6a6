"""
Packed 1.58-bit inference on the CPU: a BitNet Qwen3 whose linears run in ternary_cpu.c.

The fake-quantized model (subln.convert_to_bitnet, bitlinear.BitLinear) is the reference; this
module is the deployment form the paper measures (Figure 1, Tables 1-2: ~10x less memory, faster
CPU inference). Every q/k/v/o/gate/up/down weight is stored as ternary codes at 2 bits per weight
(4 per byte, layout at the top of ternary_cpu.c) with its Δ (Eq. 1-2); activations are quantized
to int8 per token (Eq. 3) inside C; the products accumulate in int32 and one fp32 scale per output
finishes them. q/k/v are fused into one matrix and gate/up into another, and the RMSNorm (or
SubLN, or silu(gate)·up) in front of each linear runs inside the same C call: a token costs four
linear calls and one q/k-norm + RoPE call per layer; cffi releases the GIL while C runs. The KV
cache, attention and the embedding lookup stay in PyTorch fp32; the lm_head is fp32 (PyTorch),
bf16 or int8 (C kernels).
Not bit-equal to the fake-quantized model (fp32 sums in another order can move an activation
across an int8 rounding boundary), but greedy tokens match and logits are close (test_ternary.py).

    python build_ffi.py                                   # optional: runs on first use anyway
    python packed.py --ckpt out/distill/ckpt.pt --out out/packed.pt      # pack a checkpoint
    python packed.py --load out/packed.pt --prompt "The capital of France is" --tokenizer DIR

    from packed import PackedQwen3
    pm = PackedQwen3.from_bitnet(model, head="int8")      # model: a converted (BitLinear) Qwen3
    ids = pm.generate(idx, max_new_tokens=32)             # greedy = the fake-quantized model's
    pm.save("packed.pt"); pm = PackedQwen3.load("packed.pt")
"""
import argparse
import importlib
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlinear import BitLinear, weight_quant_int
from model import KVCache, Qwen3Config, RMSNorm, rope_cos_sin, sample

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT = "bitdistill-packed-v1"
HEADS = ("fp32", "bf16", "int8")
_LIB = None


def lib():
    """The compiled kernels (cffi `lib` and `ffi`), built on first use (see build_ffi.py)."""
    global _LIB
    if _LIB is None:
        import build_ffi
        if build_ffi.needs_build():
            print("packed.py: building the C kernels (python build_ffi.py) ...", file=sys.stderr)
            build_ffi.build(verbose=True)
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        mod = importlib.import_module(build_ffi.MODULE)
        _LIB = (mod.lib, mod.ffi)
    return _LIB


def padded_k(K):
    return lib()[0].tl_padded_k(K)


def _ptr(t, ctype):
    return _LIB[1].cast(ctype, t.data_ptr()) if _LIB else lib()[1].cast(ctype, t.data_ptr())


def _check(t, name, dtype, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _raise(err, what):
    if err == -2:
        raise RuntimeError(f"{what}: this CPU does not support the requested SIMD path")
    if err:
        raise RuntimeError(f"{what} failed with code {err}")


# ---------------------------------------------------------------------------------------------
# Thin, strict wrappers around the C functions (path -1 = best for this CPU; threads 0 = torch's)

def pack_ternary(codes):
    """codes (N, K) int8 in {-1,0,1} -> packed (N, Kp/4) uint8, 2 bits per weight."""
    _check(codes, "codes", torch.int8, 2)
    N, K = codes.shape
    out = torch.empty(N, padded_k(K) // 4, dtype=torch.uint8)
    if lib()[0].tl_pack_ternary(_ptr(codes, "int8_t *"), N, K, _ptr(out, "uint8_t *")):
        raise ValueError("codes must hold only -1, 0 and +1")
    return out


def unpack_ternary(packed, K):
    """packed (N, Kp/4) uint8 -> codes (N, K) int8."""
    _check(packed, "packed", torch.uint8, 2)
    if packed.shape[1] != padded_k(K) // 4:
        raise ValueError(f"packed has {packed.shape[1]} bytes per row, K={K} needs {padded_k(K) // 4}")
    codes = torch.empty(packed.shape[0], K, dtype=torch.int8)
    lib()[0].tl_unpack_ternary(_ptr(packed, "uint8_t *"), packed.shape[0], K, _ptr(codes, "int8_t *"))
    return codes


def quantize(x, path=-1, threads=0):
    """Eq. (3) in C: x (M, K) fp32 -> q (M, Kp) int8 zero padded, srow (M,) = γ/127, qsum (M,)."""
    _check(x, "x", torch.float32, 2)
    M, K = x.shape
    q = torch.empty(M, padded_k(K), dtype=torch.int8)
    srow, qsum = torch.empty(M), torch.empty(M, dtype=torch.int32)
    _raise(lib()[0].tl_quantize(_ptr(x, "float *"), M, K, _ptr(q, "int8_t *"), _ptr(srow, "float *"),
                                _ptr(qsum, "int32_t *"), path, threads or torch.get_num_threads()), "tl_quantize")
    return q, srow, qsum


def ternary_gemm_int(q, qsum, packed, path=-1, threads=0):
    """Exact int32 accumulators acc (M, N) = q (M, Kp) int8 · codesᵀ, from packed (N, Kp/4)."""
    _check(q, "q", torch.int8, 2), _check(qsum, "qsum", torch.int32, 1), _check(packed, "packed", torch.uint8, 2)
    (M, Kp), N = q.shape, packed.shape[0]
    if packed.shape[1] * 4 != Kp or qsum.shape[0] != M:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, qsum {tuple(qsum.shape)}, packed {tuple(packed.shape)}")
    acc = torch.empty(M, N, dtype=torch.int32)
    _raise(lib()[0].tl_ternary_gemm(_ptr(q, "int8_t *"), _ptr(qsum, "int32_t *"), M, Kp, _ptr(packed, "uint8_t *"),
                                    N, _ptr(acc, "int32_t *"), lib()[1].NULL, lib()[1].NULL, lib()[1].NULL,
                                    path, threads or torch.get_num_threads()), "tl_ternary_gemm")
    return acc


def int8_gemm_int(q, w8, wsum, path=-1, threads=0):
    """Exact int32 accumulators acc (M, N) = q (M, Kp) int8 · w8ᵀ, w8 (N, Kp) int8 with row sums wsum."""
    _check(q, "q", torch.int8, 2), _check(w8, "w8", torch.int8, 2), _check(wsum, "wsum", torch.int32, 1)
    (M, Kp), N = q.shape, w8.shape[0]
    if w8.shape[1] != Kp or wsum.shape[0] != N:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, w8 {tuple(w8.shape)}, wsum {tuple(wsum.shape)}")
    acc = torch.empty(M, N, dtype=torch.int32)
    _raise(lib()[0].tl_int8_gemm(_ptr(q, "int8_t *"), M, Kp, _ptr(w8, "int8_t *"), _ptr(wsum, "int32_t *"), N,
                                 _ptr(acc, "int32_t *"), lib()[1].NULL, lib()[1].NULL, lib()[1].NULL,
                                 path, threads or torch.get_num_threads()), "tl_int8_gemm")
    return acc


PRE_RMSNORM, PRE_SWIGLU = 1, 2  # the pre-ops ternary_cpu.c can fuse in front of a linear


def _check_linear(x, K, scale, N, norm_weight, swiglu):
    _check(x, "x", torch.float32, 2)
    width = 2 * K if swiglu else K
    if x.shape[1] != width:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects K={K}"
                         + (" times 2 (gate | up) for swiglu" if swiglu else ""))
    _check(scale, "scale", torch.float32, 1)
    if scale.shape[0] != N:
        raise ValueError(f"scale has {scale.shape[0]} entries, expected one per output row ({N})")
    if norm_weight is not None:
        _check(norm_weight, "norm_weight", torch.float32, 1)
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)}, expected ({K},)")


def ternary_linear(x, packed, scale, K, path=-1, threads=0, norm_weight=None, eps=1e-6, swiglu=False):
    """y (M, N) fp32 = ((float)acc · γ/127) · scale[n]: x (M, K) fp32, packed (N, Kp/4), scale (N,).
    Optional pre-ops, fused in C: swiglu (x is (M, 2K) = gate | up; h = silu(gate)·up), then
    RMSNorm with norm_weight (K,)."""
    _check(packed, "packed", torch.uint8, 2)
    if packed.shape[1] != padded_k(K) // 4:
        raise ValueError(f"packed has {packed.shape[1]} bytes per row, K={K} needs {padded_k(K) // 4}")
    _check_linear(x, K, scale, packed.shape[0], norm_weight, swiglu)
    return _linear(0, x, packed, None, scale, K, norm_weight, eps, swiglu, path, threads)


def int8_linear(x, w8, wsum, scale, K, path=-1, threads=0, norm_weight=None, eps=1e-6):
    """y (M, N) fp32 = ((float)acc · γ/127) · scale[n] with an int8 weight w8 (N, Kp); optional
    fused RMSNorm of x first."""
    _check(w8, "w8", torch.int8, 2), _check(wsum, "wsum", torch.int32, 1)
    if w8.shape[1] != padded_k(K) or wsum.shape[0] != w8.shape[0]:
        raise ValueError(f"w8 {tuple(w8.shape)} / wsum {tuple(wsum.shape)} do not fit K={K}")
    _check_linear(x, K, scale, w8.shape[0], norm_weight, False)
    return _linear(1, x, w8, wsum, scale, K, norm_weight, eps, False, path, threads)


def bf16_linear(x, w16, path=-1, threads=0, norm_weight=None, eps=1e-6):
    """y (M, N) fp32 = [RMSNorm](x) (M, K) fp32 times w16ᵀ, w16 (N, K) bf16: the bf16 lm_head, with
    fp32 sums in a fixed order (top of ternary_cpu.c) so that every path gives the same floats."""
    _check(w16, "w16", torch.bfloat16, 2)
    K = w16.shape[1]
    _check_linear(x, K, torch.empty(w16.shape[0]), w16.shape[0], norm_weight, False)
    return _bf16(x, w16, norm_weight, eps, path, threads)


def _bf16(x, w16, norm_weight, eps, path=-1, threads=0):
    L, ffi = _LIB or lib()
    M, (N, K) = x.shape[0], w16.shape
    y = torch.empty(M, N)
    nw = ffi.NULL if norm_weight is None else ffi.cast("float *", norm_weight.data_ptr())
    _raise(L.tl_bf16_linear(ffi.cast("float *", x.data_ptr()), M, K, PRE_RMSNORM if norm_weight is not None else 0,
                            nw, eps, ffi.cast("uint16_t *", w16.data_ptr()), N, ffi.cast("float *", y.data_ptr()),
                            path, threads or torch.get_num_threads()), "tl_bf16_linear")
    return y


def _linear(kind, x, w, wsum, scale, K, norm_weight, eps, swiglu, path=-1, threads=0):
    """The C call itself, arguments already checked (the modules below check only x per call)."""
    L, ffi = _LIB or lib()
    pre = (PRE_SWIGLU if swiglu else 0) | (PRE_RMSNORM if norm_weight is not None else 0)
    nw = ffi.NULL if norm_weight is None else ffi.cast("float *", norm_weight.data_ptr())
    M, N = x.shape[0], w.shape[0]
    y = torch.empty(M, N)
    xp, yp, sp = ffi.cast("float *", x.data_ptr()), ffi.cast("float *", y.data_ptr()), ffi.cast("float *", scale.data_ptr())
    threads = threads or torch.get_num_threads()
    if kind == 0:
        err = L.tl_ternary_linear(xp, M, K, pre, nw, eps, ffi.cast("uint8_t *", w.data_ptr()), sp, N, yp, path, threads)
    else:
        err = L.tl_int8_linear(xp, M, K, pre, nw, eps, ffi.cast("int8_t *", w.data_ptr()),
                               ffi.cast("int32_t *", wsum.data_ptr()), sp, N, yp, path, threads)
    _raise(err, "tl_ternary_linear" if kind == 0 else "tl_int8_linear")
    return y


def _module_input(x, width):
    """x (..., width) -> (M, width) for a C call, with a clear error instead of a wrong result."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous() or x2.shape[1] != width or x2.device.type != "cpu":
        _check(x2, "x", torch.float32, 2)
        raise ValueError(f"x has {x2.shape[1]} features, this layer expects {width}")
    return x2


def qk_norm_rope(qkv, n_q, n_kv, head_dim, q_w, k_w, eps, cos, sin):
    """In place on qkv (M, row) fp32: per-head RMSNorm of the q and k heads (q_w None: none), then
    rotary embedding with cos/sin (M, head_dim) -- model.py's q_norm/k_norm + apply_rope in C."""
    _check(qkv, "qkv", torch.float32, 2), _check(cos, "cos", torch.float32, 2), _check(sin, "sin", torch.float32, 2)
    M = qkv.shape[0]
    if cos.shape != (M, head_dim) or sin.shape != (M, head_dim):
        raise ValueError(f"cos/sin must be ({M}, {head_dim}), got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if q_w is not None:
        _check(q_w, "q_w", torch.float32, 1), _check(k_w, "k_w", torch.float32, 1)
    ffi = lib()[1]
    _raise(lib()[0].tl_qk_norm_rope(_ptr(qkv, "float *"), M, qkv.shape[1], n_q, n_kv, head_dim,
                                    ffi.NULL if q_w is None else _ptr(q_w, "float *"),
                                    ffi.NULL if k_w is None else _ptr(k_w, "float *"), eps,
                                    _ptr(cos, "float *"), _ptr(sin, "float *"), torch.get_num_threads()),
           "tl_qk_norm_rope")
    return qkv


def _norm_args(norm):
    """(weight, eps) of an RMSNorm module, or (None, 0) for nn.Identity (no SubLN)."""
    return (None, 0.0) if isinstance(norm, nn.Identity) else (norm.weight.detach(), norm.eps)


# ---------------------------------------------------------------------------------------------
# Modules

class PackedLinear(nn.Module):
    """y = x Wᵀ (+ b), W ternary at 2 bits per weight: one BitLinear, or several fused along the
    output dim (q/k/v, gate/up), each keeping its own Δ as the scale of its rows."""

    def __init__(self, in_features, out_features, bias=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.zeros(out_features, padded_k(in_features) // 4, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features))                 # Δ per output row
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_bitlinears(cls, *linears):
        """Pack BitLinears with the same in_features: W_i -> (codes_i, Δ_i) by Eq. (1)-(2)."""
        K = linears[0].in_features
        if any(not isinstance(l, BitLinear) or l.in_features != K for l in linears):
            raise ValueError("from_bitlinears wants BitLinear modules with equal in_features")
        codes, scales = [], []
        for l in linears:
            c, delta = weight_quant_int(l.weight.detach())
            codes.append(c)
            scales.append(delta.float().expand(l.out_features))
        has_bias = [l.bias is not None for l in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("either all or none of the fused linears may have a bias")
        m = cls(K, sum(l.out_features for l in linears), bias=all(has_bias))
        m.packed.copy_(pack_ternary(torch.cat(codes).contiguous()))
        m.scale.copy_(torch.cat(scales))
        if m.bias is not None:
            m.bias.copy_(torch.cat([l.bias.detach().float() for l in linears]))
        return m

    def forward(self, x, norm=None, swiglu=False):
        """x (..., K) -> (..., N). norm: an RMSNorm (or nn.Identity) applied to x first, in C;
        swiglu: x is (..., 2K) = gate | up and silu(gate)·up is the input (before the norm)."""
        w, eps = _norm_args(norm) if norm is not None else (None, 0.0)
        x2 = _module_input(x, self.in_features * (2 if swiglu else 1))
        y = _linear(0, x2, self.packed, None, self.scale, self.in_features, w, eps, swiglu)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """An int8 lm_head: W ≈ scale[n] · W8[n], scale = max|W[n]|/127 per row (absmax, like Eq. 3 per
    row), activations int8 per token; the same int32-then-one-scale kernel as the ternary one."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("w8", torch.zeros(out_features, padded_k(in_features), dtype=torch.int8))
        self.register_buffer("wsum", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("scale", torch.zeros(out_features))

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w):
        N, K = w.shape
        m = cls(K, N)
        for i in range(0, N, 8192):  # in row slices: no full-size fp32 temporaries
            wi = w[i:i + 8192].detach().float()
            amax = wi.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)           # (n, 1)
            m.w8[i:i + 8192, :K] = torch.round(wi * (127.0 / amax)).clamp(-127, 127).to(torch.int8)
            m.scale[i:i + 8192] = (amax / 127.0)[:, 0]
            m.wsum[i:i + 8192] = m.w8[i:i + 8192].sum(dim=1, dtype=torch.int32)
        return m

    def dequantized(self):
        """The (N, K) fp32 weight this layer stands for (an int8 embedding table reads rows of it)."""
        return self.w8[:, :self.in_features].float() * self.scale[:, None]

    def forward(self, x, norm=None):
        w, eps = _norm_args(norm) if norm is not None else (None, 0.0)
        y = _linear(1, _module_input(x, self.in_features), self.w8, self.wsum, self.scale, self.in_features,
                    w, eps, False)
        return y.view(*x.shape[:-1], self.out_features)


class PackedBlock(nn.Module):
    """One decoder layer: attention (fused q/k/v, SubLN, o) and MLP (fused gate/up, SubLN, down)."""

    def __init__(self, c):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        q_dim, kv_dim, I = self.n_head * self.head_dim, self.n_kv_head * self.head_dim, c.intermediate_size
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.qkv = PackedLinear(c.hidden_size, q_dim + 2 * kv_dim, bias=c.qkv_bias)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.attn_subln = RMSNorm(q_dim, c.rms_norm_eps) if c.subln else nn.Identity()   # Eq. (4)
        self.o = PackedLinear(q_dim, c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up = PackedLinear(c.hidden_size, 2 * I)
        self.mlp_subln = RMSNorm(I, c.rms_norm_eps) if c.subln else nn.Identity()        # Eq. (5)
        self.down = PackedLinear(I, c.hidden_size)

    def forward(self, x, cos, sin, cache, layer_idx):
        """x (B, T, C) fp32; cos/sin (B*T, hd). Four C calls (each with its RMSNorm fused in),
        one for q/k norms + RoPE, and PyTorch for the cache and attention."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x, norm=self.input_layernorm)                      # (B, T, (nh+2nkv)*hd)
        qk_w = (None, None) if self.q_norm is None else (self.q_norm.weight.detach(), self.k_norm.weight.detach())
        qk_norm_rope(qkv.view(B * T, -1), nh, nkv, hd, *qk_w, self.eps, cos, sin)  # in place
        q, k, v = qkv.view(B, T, nh + 2 * nkv, hd).transpose(1, 2).split([nh, nkv, nkv], dim=1)  # (B, h, T, hd)
        past = 0
        if cache is not None:
            past = cache.length
            cache.k[layer_idx][:, :, past:past + T] = k
            cache.v[layer_idx][:, :, past:past + T] = v
            k, v = cache.k[layer_idx][:, :, :past + T], cache.v[layer_idx][:, :, :past + T]
        mask = None  # one new token (decode) sees every cached one; a first chunk is plain causal
        if T > 1 and past > 0:  # a later chunk: query i (absolute past+i) sees keys j <= past+i
            mask = torch.arange(past + T)[None, :] <= torch.arange(past, past + T)[:, None]  # (T, S)
        # Eq. (6) with grouped-query attention (kv head h serves query heads h*rep .. h*rep+rep-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and past == 0,
                                           enable_gqa=True)                               # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)                                      # (B, T, nh*hd)
        x = x + self.o(y, norm=self.attn_subln)                                           # Eq. (4)
        gate_up = self.gate_up(x, norm=self.post_attention_layernorm)                     # (B, T, 2I)
        return x + self.down(gate_up, norm=self.mlp_subln, swiglu=True)                   # Eq. (5)


class PackedQwen3(nn.Module):
    """A 1.58-bit Qwen3 for CPU inference. head: the embedding table and lm_head kept in "fp32"
    (PyTorch matmul, the reference), "bf16" (C matrix-vector, fp32 sums) or "int8" (one scale per
    row, the int8 C kernel). A tied table is stored once and also serves the embedding lookups."""

    def __init__(self, config, head="int8"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if not config.bitnet:
            raise ValueError("config.bitnet is False: pack a converted model (subln.convert_to_bitnet)")
        self.config, self.head_kind = config, head
        V, C = config.vocab_size, config.hidden_size
        if head == "int8":
            self.embed = Int8Linear(C, V)
            self.lm_head = None if config.tie_word_embeddings else Int8Linear(C, V)
        else:
            dtype = torch.float32 if head == "fp32" else torch.bfloat16
            self.register_buffer("embed_weight", torch.zeros(V, C, dtype=dtype))
            self.register_buffer("lm_head_weight", None if config.tie_word_embeddings else torch.zeros(V, C, dtype=dtype))
        self.layers = nn.ModuleList([PackedBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(C, config.rms_norm_eps)

    @classmethod
    @torch.no_grad()
    def from_bitnet(cls, model, head="int8"):
        """From a converted (BitLinear) Qwen3, e.g. subln.load_model(ckpt) of a distill.py run."""
        c = Qwen3Config.from_dict(model.config.to_dict())
        pm = cls(c, head)
        emb = model.model.embed_tokens.weight.detach()
        lm = None if c.tie_word_embeddings else model.lm_head.weight.detach()
        if head == "int8":
            pm.embed = Int8Linear.from_weight(emb)
            if lm is not None:
                pm.lm_head = Int8Linear.from_weight(lm)
        else:
            pm.embed_weight.copy_(emb)
            if lm is not None:
                pm.lm_head_weight.copy_(lm)
        pm.norm.weight.copy_(model.model.norm.weight)
        for pb, blk in zip(pm.layers, model.model.layers):
            a, mlp = blk.self_attn, blk.mlp
            pb.input_layernorm.weight.copy_(blk.input_layernorm.weight)
            pb.post_attention_layernorm.weight.copy_(blk.post_attention_layernorm.weight)
            pb.qkv = PackedLinear.from_bitlinears(a.q_proj, a.k_proj, a.v_proj)
            pb.o = PackedLinear.from_bitlinears(a.o_proj)
            pb.gate_up = PackedLinear.from_bitlinears(mlp.gate_proj, mlp.up_proj)
            pb.down = PackedLinear.from_bitlinears(mlp.down_proj)
            if c.qk_norm:
                pb.q_norm.weight.copy_(a.q_norm.weight)
                pb.k_norm.weight.copy_(a.k_norm.weight)
            if c.subln:
                pb.attn_subln.weight.copy_(a.subln.weight)
                pb.mlp_subln.weight.copy_(mlp.subln.weight)
        return pm

    def embed_tokens(self, idx):
        if self.head_kind == "int8":  # de-quantize the looked-up rows: (B, T, C)
            return self.embed.w8[idx, :self.config.hidden_size].float() * self.embed.scale[idx][..., None]
        return self.embed_weight[idx].float()

    def logits(self, x):
        """Final RMSNorm, then the lm_head (tied: the embedding table)."""
        if self.head_kind == "int8":
            return (self.lm_head or self.embed)(x.contiguous(), norm=self.norm)
        w = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        if self.head_kind == "bf16":  # C: fp32 activations times bf16 weights, fp32 sums
            x2 = _module_input(x.contiguous(), self.config.hidden_size)
            return _bf16(x2, w, self.norm.weight.detach(), self.norm.eps).view(*x.shape[:-1], -1)
        return F.linear(self.norm(x), w)  # fp32: PyTorch, exactly as the fake-quantized model

    @torch.no_grad()
    def forward(self, idx, cache=None, last_only=False):
        """idx (B, T) -> logits (B, T, vocab) fp32, or (B, 1, vocab) with last_only. No padding."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {past + T} requested")
        pos = torch.arange(past, past + T)[None].expand(B, T)                    # (B, T)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)  # (B, T, hd)
        cos, sin = cos.reshape(B * T, -1).contiguous(), sin.reshape(B * T, -1).contiguous()
        x = self.embed_tokens(idx)                                                # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        return self.logits(x[:, -1:] if last_only else x)   # the final norm is fused into logits

    def new_cache(self, batch_size, max_len):
        return KVCache(self.config, batch_size, max_len, "cpu", torch.float32)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, generator=None):
        """Greedy at temperature 0, top-p sampling otherwise (model.sample). Prompts of equal
        length only (no padding). Returns (B, T + new) ids."""
        B, T = idx.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(idx, cache, last_only=True)[:, -1]                          # (B, V)
        out, done = [idx], torch.zeros(B, dtype=torch.bool)
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator)                   # (B,)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(nxt[:, None], cache)[:, -1]
        return torch.cat(out, dim=1)

    def memory(self):
        """Bytes held, by part: packed linears (2-bit codes + their fp32 scales/biases), the
        embedding table and lm_head, and everything else (norms)."""
        lin = sum(b.numel() * b.element_size() for m in self.modules() if isinstance(m, PackedLinear)
                  for b in m.buffers())
        emb = sum(b.numel() * b.element_size() for n, b in self.named_buffers()
                  if n.startswith(("embed", "lm_head")))
        total = sum(b.numel() * b.element_size() for b in self.buffers()) + \
            sum(p.numel() * p.element_size() for p in self.parameters())
        return dict(linears=lin, embed_and_head=emb, other=total - lin - emb, total=total)

    def save(self, path):
        torch.save(dict(format=FORMAT, config=self.config.to_dict(), head=self.head_kind,
                        state_dict=self.state_dict()), path)

    @classmethod
    def load(cls, path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"{path} is not a packed model ({FORMAT}); pack one with "
                             "`python packed.py --ckpt CKPT --out OUT`")
        pm = cls(Qwen3Config.from_dict(ckpt["config"]), ckpt["head"])
        pm.load_state_dict(ckpt["state_dict"], strict=True)  # every key and shape checked
        return pm


def main():
    ap = argparse.ArgumentParser(description="Pack a 1.58-bit checkpoint for CPU inference, or run one.")
    ap.add_argument("--ckpt", help="a distill.py / continue_train.py checkpoint (.pt) to pack")
    ap.add_argument("--out", help="where to write the packed model")
    ap.add_argument("--head", default="int8", choices=HEADS)
    ap.add_argument("--load", help="a packed model to run")
    ap.add_argument("--tokenizer", help="tokenizer folder (e.g. ../shared/data/tokenizers/qwen3)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--check", action="store_true", help="also run the fake-quantized model and compare")
    args = ap.parse_args()
    import build_ffi
    print(f"packed.py: {build_ffi.describe(lib()[0])}")
    if args.ckpt:
        from subln import load_model
        model = load_model(args.ckpt).eval()
        pm = PackedQwen3.from_bitnet(model, args.head)
        mem = pm.memory()
        print(f"packed {args.ckpt}: linears {mem['linears'] / 1e6:.1f} MB, embedding+head "
              f"{mem['embed_and_head'] / 1e6:.1f} MB ({args.head}), total {mem['total'] / 1e6:.1f} MB")
        if args.out:
            pm.save(args.out)
            print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB on disk)")
    elif args.load:
        pm, model = PackedQwen3.load(args.load), None
    else:
        ap.error("pass --ckpt (to pack) or --load (to run)")
    if args.tokenizer:
        from tokenizer import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
        idx = torch.tensor([tok.encode(args.prompt)])
        out = pm.generate(idx, args.max_new_tokens)
        print(repr(tok.decode(out[0].tolist())))
        if args.check and args.ckpt:
            ref = model.generate(idx, args.max_new_tokens)
            print(f"fake-quantized model: {repr(tok.decode(ref[0].tolist()))}")
            print(f"greedy tokens identical: {torch.equal(out, ref)}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, TypeError) as e:
        # bad input: say what is wrong and how to fix it, without a traceback
        raise SystemExit(f"packed.py: error: {e}")
