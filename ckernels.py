"""
The C kernels of ternary_cpu.c, seen from Python: thin, strict wrappers (dtype, shape, contiguity
and device checked on every call; a wrong input is an error, never a wrong result).

ternary_cpu.c (layout documented at its top) holds ternary weights at 2 bits, quantizes
activations to int8 per token (Eq. 3), accumulates in int32 and applies one fp32 scale per output.
Every kernel has a plain-C path (path 0) and SIMD paths chosen at run time (path -1: the best this
CPU has) that equal it bit for bit. build_ffi.py compiles it with cffi; lib() builds on first use.

    import ckernels
    packed = ckernels.pack_ternary(codes)                         # (N, K) int8 -> (N, Kp/4) uint8
    y = ckernels.ternary_linear(x, packed, scale, K)              # (M, K) fp32 -> (M, N) fp32
    acc = ckernels.ternary_gemm_int(*ckernels.quantize(x)[::2], packed)   # exact int32 accumulators

packed.py builds the 1.58-bit model from these; test_ternary.py checks them against PyTorch.
decode_attention and DecodeStep wrap decode_cpu.c (one decode token in one C call; test_decode.py).
"""
import importlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
_LIB = None


def lib():
    """The compiled kernels (cffi `lib` and `ffi`), built on first use (see build_ffi.py). A missing
    or damaged module is (re)built; an out-of-date one that cannot be rebuilt is used with a warning."""
    global _LIB
    if _LIB is None:
        import build_ffi
        state = build_ffi.module_state()
        if state != "ok":
            print(f"ckernels.py: building the C kernels ({state} module; python build_ffi.py) ...", file=sys.stderr)
            try:
                build_ffi.build(verbose=True)
            except build_ffi.BuildError as e:
                if state != "stale":
                    raise build_ffi.BuildError(f"the C kernels are {state} and cannot be built: {e}") from None
                print(f"ckernels.py: WARNING: ternary_cpu.c changed since the module was built, and it cannot be "
                      f"rebuilt ({e}); using the built one", file=sys.stderr)
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        mod = importlib.import_module(build_ffi.MODULE)
        _LIB = (mod.lib, mod.ffi)
    return _LIB


def cpu_flags():
    """The SIMD-related flags of this CPU (Linux /proc/cpuinfo; [] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((set(l.split(":")[1].split()) for l in f if l.startswith("flags")), set())
    except OSError:
        have = set()
    return [fl for fl in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                          "amx_tile", "amx_int8", "amx_bf16") if fl in have]


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


def quantize(x, path=-1, threads=0, clamp=False):
    """Eq. (3) in C: x (M, K) fp32 -> q (M, Kp) int8 zero padded, srow (M,) = γ/127, qsum (M,);
    clamp: max(γ, ε) in place of γ + ε (bitlinear.activation_quant_int(x, "clamp"))."""
    _check(x, "x", torch.float32, 2)
    M, K = x.shape
    q = torch.empty(M, padded_k(K), dtype=torch.int8)
    srow, qsum = torch.empty(M), torch.empty(M, dtype=torch.int32)
    _raise(lib()[0].tl_quantize(_ptr(x, "float *"), M, K, _ptr(q, "int8_t *"), _ptr(srow, "float *"),
                                _ptr(qsum, "int32_t *"), int(clamp), path, threads or torch.get_num_threads()),
           "tl_quantize")
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


def ternary_linear(x, packed, scale, K, path=-1, threads=0, norm_weight=None, eps=1e-6, swiglu=False, clamp=False):
    """y (M, N) fp32 = ((float)acc · γ/127) · scale[n]: x (M, K) fp32, packed (N, Kp/4), scale (N,).
    Optional pre-ops, fused in C: swiglu (x is (M, 2K) = gate | up; h = silu(gate)·up), then
    RMSNorm with norm_weight (K,). clamp: Eq. (3) with max(γ, ε)."""
    _check(packed, "packed", torch.uint8, 2)
    if packed.shape[1] != padded_k(K) // 4:
        raise ValueError(f"packed has {packed.shape[1]} bytes per row, K={K} needs {padded_k(K) // 4}")
    _check_linear(x, K, scale, packed.shape[0], norm_weight, swiglu)
    return linear_call(0, x, packed, None, scale, K, norm_weight, eps, swiglu, path, threads, clamp)


def int8_linear(x, w8, wsum, scale, K, path=-1, threads=0, norm_weight=None, eps=1e-6, clamp=False):
    """y (M, N) fp32 = ((float)acc · γ/127) · scale[n] with an int8 weight w8 (N, Kp); optional
    fused RMSNorm of x first."""
    _check(w8, "w8", torch.int8, 2), _check(wsum, "wsum", torch.int32, 1)
    if w8.shape[1] != padded_k(K) or wsum.shape[0] != w8.shape[0]:
        raise ValueError(f"w8 {tuple(w8.shape)} / wsum {tuple(wsum.shape)} do not fit K={K}")
    _check_linear(x, K, scale, w8.shape[0], norm_weight, False)
    return linear_call(1, x, w8, wsum, scale, K, norm_weight, eps, False, path, threads, clamp)


def bf16_linear(x, w16, path=-1, threads=0, norm_weight=None, eps=1e-6):
    """y (M, N) fp32 = [RMSNorm](x) (M, K) fp32 times w16ᵀ, w16 (N, K) bf16: the bf16 lm_head, with
    fp32 sums in a fixed order (top of ternary_cpu.c) so that every path gives the same floats."""
    _check(w16, "w16", torch.bfloat16, 2)
    K = w16.shape[1]
    _check_linear(x, K, torch.empty(w16.shape[0]), w16.shape[0], norm_weight, False)
    return bf16_call(x, w16, norm_weight, eps, path, threads)


def bf16_call(x, w16, norm_weight, eps, path=-1, threads=0):
    """tl_bf16_linear itself, arguments already checked (PackedQwen3's lm_head checks only x)."""
    L, ffi = _LIB or lib()
    M, (N, K) = x.shape[0], w16.shape
    y = torch.empty(M, N)
    nw = ffi.NULL if norm_weight is None else ffi.cast("float *", norm_weight.data_ptr())
    _raise(L.tl_bf16_linear(ffi.cast("float *", x.data_ptr()), M, K, L.TL_PRE_RMSNORM if norm_weight is not None else 0,
                            nw, eps, ffi.cast("uint16_t *", w16.data_ptr()), N, ffi.cast("float *", y.data_ptr()),
                            path, threads or torch.get_num_threads()), "tl_bf16_linear")
    return y


def linear_call(kind, x, w, wsum, scale, K, norm_weight, eps, swiglu, path=-1, threads=0, clamp=False):
    """tl_ternary_linear (kind 0) / tl_int8_linear (kind 1) itself, arguments already checked: the
    packed modules check their weights once and only x per call (as_matrix). clamp: Eq. (3) with max(γ, ε)."""
    L, ffi = _LIB or lib()
    pre = ((L.TL_PRE_SWIGLU if swiglu else 0) | (L.TL_PRE_RMSNORM if norm_weight is not None else 0)   # ternary.h
           | (L.TL_QUANT_CLAMP if clamp else 0))
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


def as_matrix(x, width):
    """x (..., width) -> (M, width) for a C call, with a clear error instead of a wrong result."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous() or x2.shape[1] != width or x2.device.type != "cpu":
        _check(x2, "x", torch.float32, 2)
        raise ValueError(f"x has {x2.shape[1]} features, this layer expects {width}")
    return x2


def rmsnorm(x, weight, eps):
    """y (M, K) = RMSNorm of each row of x (M, K) fp32, times weight (K,): the C pre-op alone."""
    _check(x, "x", torch.float32, 2), _check(weight, "weight", torch.float32, 1)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[0]} entries, x has {x.shape[1]} features")
    y = torch.empty_like(x)
    _raise(lib()[0].tl_rmsnorm(_ptr(x, "float *"), x.shape[0], x.shape[1], _ptr(weight, "float *"), eps,
                               _ptr(y, "float *"), torch.get_num_threads()), "tl_rmsnorm")
    return y


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


def decode_attention(q, k_cache, v_cache, n, path=-1, threads=0):
    """Attention of one new token (decode_cpu.c's tl_attention, the one the C decode step runs):
    q (n_q*hd,) fp32 against the first n positions of k_cache / v_cache (n_kv, max_len, hd) fp16;
    returns y (n_q*hd,). Equal to softmax(q kᵀ/√hd) v per head within fp32 rounding."""
    _check(q, "q", torch.float32, 1), _check(k_cache, "k_cache", torch.float16, 3)
    _check(v_cache, "v_cache", torch.float16, 3)
    n_kv, max_len, hd = k_cache.shape
    if v_cache.shape != k_cache.shape or q.shape[0] % (n_kv * hd) or not 0 < n <= max_len:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, n {n}")
    n_q = q.shape[0] // hd
    y, att = torch.empty(n_q * hd), torch.empty(n_q * n)
    _raise(lib()[0].tl_attention(_ptr(q, "float *"), _ptr(k_cache, "uint16_t *"), _ptr(v_cache, "uint16_t *"), n_q,
                                 n_kv, hd, max_len, n, _ptr(y, "float *"), _ptr(att, "float *"), path,
                                 threads or torch.get_num_threads()), "tl_attention")
    return y


# ---------------------------------------------------------------------------------------------
# The decode step: one C call per token (decode_cpu.c) for a PackedQwen3

class DecodeStep:
    """Runs one decode token of a packed model (packed.PackedQwen3) in one C call: every layer,
    the final norm and the lm_head (decode_cpu.c). Holds the tl_model struct of pointers into the
    model's tensors (built once) and, per KV cache, the cache pointers, the RoPE table and the
    scratch buffer. timing[0..2]: seconds in the linears, the lm_head and the whole last call.
    One decode at a time per model (the scratch is shared); a module whose tensors are replaced
    needs a new step (PackedQwen3._apply drops it)."""

    def __init__(self, pm, rope_table):
        c = pm.config
        L, ffi = lib()
        self.pm, self.rope_table, self.cache, self.threads = pm, rope_table, None, None
        ptr = lambda t, ct="float *": ffi.NULL if t is None else ffi.cast(ct, t.data_ptr())
        w = lambda norm: None if isinstance(norm, torch.nn.Identity) else norm.weight.detach()
        self.layers = ffi.new("tl_layer[]", c.num_hidden_layers)
        for ly, pb in zip(self.layers, pm.layers):
            ly.in_norm, ly.post_norm = ptr(w(pb.input_layernorm)), ptr(w(pb.post_attention_layernorm))
            for name, fused, parts, norms in (("qkv", "qkv", "qkv_parts", (0, 1, 2)), ("gate_up", "gate_up", "gate_up_parts", (3, 4))):
                lins = list(getattr(pb, parts)) if pb.subln_all else [getattr(pb, fused)]
                setattr(ly, "n_" + name, len(lins))
                for i, (part, lin) in enumerate(zip(getattr(ly, name), lins)):   # one fused part, or 3 / 2 with SubLNs
                    part.w, part.scale, part.bias, part.rows = (ptr(lin.packed, "uint8_t *"), ptr(lin.scale),
                                                                ptr(lin.bias), lin.out_features)
                    part.norm = ptr(w(pb.in_norms[norms[i]]) if pb.subln_all else None)
            ly.q_norm = ptr(None if pb.q_norm is None else w(pb.q_norm))
            ly.k_norm = ptr(None if pb.k_norm is None else w(pb.k_norm))
            ly.attn_subln, ly.mlp_subln = ptr(w(pb.attn_subln)), ptr(w(pb.mlp_subln))
            ly.o, ly.o_scale = ptr(pb.o.packed, "uint8_t *"), ptr(pb.o.scale)
            ly.down, ly.down_scale = ptr(pb.down.packed, "uint8_t *"), ptr(pb.down.scale)
        m = self.model = ffi.new("tl_model *")
        m.dim, m.hidden, m.n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        m.n_q, m.n_kv, m.head_dim, m.vocab, m.eps = (c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                                     c.vocab_size, c.rms_norm_eps)
        m.layers, m.final_norm = self.layers, ptr(pm.norm.weight.detach())
        if pm.head_kind == "int8":
            head = pm.lm_head or pm.embed
            m.head_kind, m.head_w, m.head_wsum = L.TL_HEAD_INT8, ptr(head.w8, "void *"), ptr(head.wsum, "int32_t *")
            m.head_scale, m.embed_w, m.embed_scale = ptr(head.scale), ptr(pm.embed.w8, "void *"), ptr(pm.embed.scale)
        else:
            head = pm.embed_weight if pm.lm_head_weight is None else pm.lm_head_weight
            m.head_kind, m.head_w, m.embed_w = L.TL_HEAD_BF16, ptr(head, "void *"), ptr(pm.embed_weight, "void *")
        m.quant_clamp = int(c.quant_eps == "clamp")
        self.timing = ffi.new("double[3]")

    def bind(self, cache):
        """Point the layers at this cache's tensors (batch row 0) and size the scratch for it."""
        L, ffi = lib()
        for ly, k, v in zip(self.layers, cache.k, cache.v):
            if k.dtype != torch.float16 or not (k.is_contiguous() and v.is_contiguous()) or k.shape[0] != 1:
                raise ValueError("the C decode step needs a contiguous fp16 KV cache of batch size 1")
            ly.k_cache, ly.v_cache = ffi.cast("uint16_t *", k.data_ptr()), ffi.cast("uint16_t *", v.data_ptr())
        self.cos, self.sin = self.rope_table(cache.max_len)                     # (max_len, hd) each
        self.model.max_len = cache.max_len
        self.model.rope_cos, self.model.rope_sin = _ptr(self.cos, "float *"), _ptr(self.sin, "float *")
        self.scratch = torch.empty(L.tl_decode_scratch_bytes(self.model), dtype=torch.uint8)
        self.cache = cache

    def __call__(self, token, cache, path=-1, threads=0):
        """Logits (1, V) fp32 of `token` at position cache.length; appends its k/v to the cache."""
        if cache is not self.cache or cache.max_len != self.model.max_len:
            self.bind(cache)
        L, ffi = lib()
        logits = torch.empty(1, self.model.vocab)
        _raise(L.tl_decode_token(self.model, int(token), cache.length, _ptr(logits, "float *"),
                                 _ptr(self.scratch, "void *"), self.timing, path,
                                 threads or torch.get_num_threads()), "tl_decode_token")
        return logits
