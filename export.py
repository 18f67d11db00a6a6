"""
Export a distilled 1.58-bit student as a GGUF file that mainline llama.cpp runs, through its
`bitnet` architecture (llama.cpp's src/models/bitnet.cpp); check a file, without llama.cpp or in it.

llama.cpp's `bitnet` block is the paper's block exactly: RMSNorm -> q/k/v -> RoPE (NEOX, i.e. the
"rotate half" of model.apply_rope, so Q/K stay in Hugging Face order) -> attention -> SubLN
(`attn_sub_norm`, Eq. 4) -> o_proj, residual; RMSNorm -> gate, up -> silu(gate) * up -> SubLN
(`ffn_sub_norm`, Eq. 5) -> down_proj, residual; a final RMSNorm and the tied embedding as the head.
Every projection is y = (W x) * s with W the ternary codes and s = Δ, a {1} tensor `<name>.scale`.
So what it can hold is a llama-architecture student (SmolLM2) with the paper's SubLN placement
(`--subln_at o_down`), a tied head, no biases, n_heads x head_dim = hidden, one RMSNorm eps:
anything else is refused with the reason (Qwen3's q/k-norm has no place in the graph).

Two files from the same codes and Δ (ours, never re-ternarised):
    exact     the codes as F32 {-1, 0, +1}: llama.cpp multiplies in fp32 (no activation quantization)
    compact   the codes as ggml's Q2_0 (64 codes per block: an fp16 d = 1, then 2 bits per code,
              code c stored as c + 1), 2.25 bits per weight; llama.cpp's CPU then quantizes the
              activations to 8 bits per block of 32 (its Q8_0 dot products), not per token (Eq. 3)
Norms and the embedding are F32 in both. The tokenizer is copied from the base model's GGUF.
PyPI's `gguf` knows no Q2_0 (type 42): its bytes are written here, and read back by our own
reader of the container (read_container), which the tests hold against the `gguf` package.

    python export.py --ckpt out/.../bitdistill/ckpt.pt --out student.gguf            # exact
    python export.py --ckpt out/.../bitdistill/ckpt.pt --out student-q2.gguf --compact
    python export.py --check student.gguf --ckpt out/.../bitdistill/ckpt.pt           # read back and compare
    python export.py --ckpt smollm2 --convert --out s.gguf --compact                    # the path, untrained
    python export.py --ckpt smollm2 --convert --in_llama_cpp s.gguf   # in llama.cpp (pip install llama-cpp-python)

--check reads the file back (every code and Δ equal to the checkpoint's, every norm and the
embedding byte-equal) and runs llama.cpp's `bitnet` graph in NumPy as its source writes it,
against our model with the same weights (activations unquantized on both sides).
"""
import argparse
import enum
import functools
import json
import os
import struct
import time

import numpy as np
import torch

from bitlinear import BitLinear, weight_quant_int
from gguf_model import read_gguf
from harness import HelpFormatter, atomic_write, provenance, run_cli, write_json
from model import read_checkpoint, model_from
from subln import convert_to_bitnet

ARCH = "bitnet"
QK2_0 = 64                    # codes per Q2_0 block (ggml-common.h: block_q2_0)
Q2_0_BYTES = 2 + QK2_0 // 4   # fp16 d, then 16 bytes of 2-bit codes


class GGMLType(enum.IntEnum):  # the ggml tensor types these files use (ggml.h)
    F32 = 0
    Q2_0 = 42

# our key (per layer N) -> the name in a `bitnet` GGUF
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "self_attn.subln": "attn_sub_norm",
         "post_attention_layernorm": "ffn_norm", "mlp.subln": "ffn_sub_norm"}


# ----------------------------------------------------------------------------- what the graph can hold

def refusal(model):
    """None if llama.cpp's `bitnet` graph computes this model, else the reason in a few words."""
    c = model.config
    if not c.bitnet:
        return "it is a full-precision model: export a 1.58-bit student (continue_train.py / distill.py)"
    if c.gemma:
        return ("it is a Gemma 3: llama.cpp's bitnet graph has no (1 + w) or sandwich norms, GeGLU or "
                "sliding-window layers")
    if c.qk_norm:
        return ("it has q/k-norm (Qwen3): llama.cpp's bitnet graph has no place for it (bitnet.cpp's own "
                "qwen3 dialect would be needed); export a llama-architecture student such as SmolLM2")
    if not c.subln:
        return "it has no SubLN: the bitnet graph always applies attn_sub_norm and ffn_sub_norm"
    if c.subln_all:
        return ("its SubLN sits before all seven projections (--subln_at all): the bitnet graph has one only "
                "before o_proj and down_proj; train the student with --subln_at o_down")
    if not c.tie_word_embeddings:
        return "its lm_head is untied: the bitnet graph uses the embedding as the head"
    if c.weight_quant not in ("absmean", "gptq"):
        return (f"its weight quantizer {c.weight_quant} keeps a scale per {'block' if c.weight_quant == 'block' else 'row'}"
                ": the bitnet graph has one .scale per matrix (absmean, gptq)")
    if c.qkv_bias or any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear)):
        return "it has biases: the bitnet graph has none"
    if c.num_attention_heads * c.head_dim != c.hidden_size:
        return f"n_heads x head_dim = {c.num_attention_heads * c.head_dim} is not hidden = {c.hidden_size}"
    eps = {m.eps for m in model.modules() if hasattr(m, "eps") and isinstance(m.eps, float)}
    if eps != {c.rms_norm_eps}:
        return f"its norms use several eps {sorted(eps)}: llama.cpp has one for every norm"
    return None


# ----------------------------------------------------------------------------- Q2_0 bytes

def q2_0_bytes(codes):
    """codes (N, K) int8 in {-1, 0, 1}, K a multiple of 64 -> (N, K/64 * 18) uint8: per block d = 1.0
    as fp16, then byte j/4 holds code j in bits 2(j%4)..2(j%4)+1 as c + 1 (ggml's dequantize_row_q2_0)."""
    N, K = codes.shape
    u = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(N, K // QK2_0, QK2_0 // 4, 4)   # (N, blocks, 16, 4)
    qs = u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)                   # (N, blocks, 16)
    d = np.broadcast_to(np.frombuffer(np.float16(1.0).tobytes(), np.uint8), (N, K // QK2_0, 2))
    return np.concatenate([d, qs], axis=-1).reshape(N, -1)


def q2_0_decode(raw, N, K):
    """The inverse, as ggml dequantizes it: (codes (N, K) int8, d (N, K/64) float32)."""
    b = raw.reshape(N, K // QK2_0, Q2_0_BYTES)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 2:]
    u = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(N, K)
    return u.astype(np.int8) - 1, d


# ----------------------------------------------------------------------------- writing

def tensors_of(model, compact):
    """[(gguf name, array, ggml type, (rows, cols))] in file order: the embedding, the final norm, then
    per layer its four norms and seven projections (codes + Δ)."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["model.embed_tokens.weight"].numpy(), GGMLType.F32, None),
           ("output_norm.weight", sd["model.norm.weight"].numpy(), GGMLType.F32, None)]
    for i, block in enumerate(model.model.layers):
        for ours, name in NORMS.items():
            out.append((f"blk.{i}.{name}.weight", sd[f"model.layers.{i}.{ours}.weight"].numpy(), GGMLType.F32, None))
        for ours, name in LINEARS.items():
            lin = block.get_submodule(ours)
            codes, delta = weight_quant_int(lin.weight.detach(), lin.quantizer, lin.eps)   # Eq. (1)-(2): (N, K) int8, ()
            codes = codes.numpy()
            if compact:
                out.append((f"blk.{i}.{name}.weight", q2_0_bytes(codes), GGMLType.Q2_0, codes.shape))
            else:
                out.append((f"blk.{i}.{name}.weight", codes.astype(np.float32), GGMLType.F32, None))
            out.append((f"blk.{i}.{name}.scale", np.array([delta.item()], np.float32), GGMLType.F32, None))
    return out


@functools.lru_cache(maxsize=2)
def tokenizer_fields(path):
    """The base model's `tokenizer.*` metadata as (key, value, type, sub type), read from its GGUF."""
    import gguf
    reader = read_gguf(path)
    out = []
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            out.append((key, f.contents(), f.types[0], sub))
    return tuple(out)


def export(model, tokenizer_gguf, out, compact=False, name="bitdistill student"):
    """Writes the `bitnet` GGUF of `model` to `out` atomically. Returns the number of tensors."""
    import gguf
    why = refusal(model)
    if why:
        raise ValueError(f"this checkpoint cannot be a llama.cpp bitnet GGUF: {why}")
    c = model.config
    if compact and c.hidden_size % QK2_0 or compact and c.intermediate_size % QK2_0:
        raise ValueError(f"--compact stores blocks of {QK2_0} codes: hidden {c.hidden_size} and intermediate "
                         f"{c.intermediate_size} must be multiples of {QK2_0}; use the exact file")
    if tokenizer_gguf is None or not tokenizer_gguf.endswith(".gguf"):
        raise ValueError(f"the checkpoint's tokenizer ({tokenizer_gguf}) is not a GGUF: llama.cpp needs the base "
                         "model's tokenizer metadata (students of SmolLM2 record it)")
    tensors = tensors_of(model, compact)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name(name)
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_theta)                 # llama.cpp's default is 1e4: always written
        w.add_rope_dimension_count(c.head_dim)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)           # every norm, SubLN included
        w.add_vocab_size(c.vocab_size)
        for key, value, vtype, sub in tokenizer_fields(tokenizer_gguf):
            w.add_key_value(key, value, vtype, sub)
        for tname, arr, kind, shape in tensors:
            if kind == GGMLType.Q2_0:   # raw bytes of a type the gguf package does not know: shape given
                w.add_tensor(tname, arr.view(np.int8), raw_shape=shape, raw_dtype=kind)
            else:
                w.add_tensor(tname, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    atomic_write(out, write)
    return len(tensors)


# ----------------------------------------------------------------------------- reading back

def read_container(path):
    """(metadata {key: value}, tensors {name: (ggml type, (rows, cols) or (n,), raw bytes)}) of a GGUF
    v3 file, parsed from its layout (ggml/docs/gguf.md): the header, the key/value pairs, the tensor
    infos, then the data at the alignment. Any tensor type, Q2_0 included."""
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            sub, n = take("I"), take("Q")
            return [value(sub) for _ in range(n)]
        return take(scalar[t])
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version != 3:
        raise ValueError(f"{path}: GGUF version {version}, this reader reads 3")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name, nd = string(), take("I")
        dims = [take("Q") for _ in range(nd)]
        infos.append((name, take("I"), dims, take("Q")))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    sizes = {GGMLType.F32: lambda n: 4 * n, GGMLType.Q2_0: lambda n: n // QK2_0 * Q2_0_BYTES}
    tensors = {}
    for name, kind, dims, offset in infos:
        n = int(np.prod(dims))
        nbytes = sizes[GGMLType(kind)](n)
        tensors[name] = (GGMLType(kind), tuple(reversed(dims)), buf[start + offset:start + offset + nbytes])
    return meta, tensors


def weights_from(tensors):
    """{name: float32 array} of a read_container() result: F32 as is, Q2_0 decoded to codes x d."""
    out = {}
    for name, (kind, shape, raw) in tensors.items():
        if kind == GGMLType.F32:
            out[name] = np.frombuffer(raw, np.float32).reshape(shape)
        else:
            codes, d = q2_0_decode(np.frombuffer(raw, np.uint8), *shape)
            out[name] = codes.astype(np.float32) * np.repeat(d, QK2_0, axis=1)
    return out


# ----------------------------------------------------------------------------- llama.cpp's graph, in NumPy

def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_neox(x, pos, theta):
    """x (T, heads, d): rotate the halves (x_i, x_{i+d/2}) by pos * theta^(-2i/d) (LLAMA_ROPE_TYPE_NEOX)."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)    # (T, d/2)
    cos, sin = np.cos(ang)[:, None].astype(np.float32), np.sin(ang)[:, None].astype(np.float32)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def bitnet_forward(meta, w, ids):
    """Logits (T, V) of one sequence, as src/models/bitnet.cpp builds its graph: every projection
    `build_lora_mm(W, x, W_s)` = (W x) * s; causal softmax attention with GQA, scale 1/sqrt(d)."""
    get = lambda k: meta[f"{ARCH}.{k}"]                                           # noqa: E731
    L, nh, nkv, eps = get("block_count"), get("attention.head_count"), get("attention.head_count_kv"), \
        get("attention.layer_norm_rms_epsilon")
    theta = get("rope.freq_base")
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    scale = lambda i, n: w[f"blk.{i}.{n}.scale"][0] if f"blk.{i}.{n}.scale" in w else 1.0   # optional there
    mm = lambda i, n, x: (x @ w[f"blk.{i}.{n}.weight"].T) * scale(i, n)          # noqa: E731
    x = w["token_embd.weight"][ids]                                              # (T, C)
    causal = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for i in range(L):
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], eps)
        q, k, v = mm(i, "attn_q", h), mm(i, "attn_k", h), mm(i, "attn_v", h)
        d = q.shape[-1] // nh
        q = rope_neox(q.reshape(T, nh, d), pos, theta)
        k = rope_neox(k.reshape(T, nkv, d), pos, theta)
        v = v.reshape(T, nkv, d)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)                  # head h uses KV head h // rep
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(np.float32(d)) + causal       # (heads, T, T)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        y = np.einsum("hts,shd->thd", att, v).reshape(T, nh * d)
        y = rms_norm(y, w[f"blk.{i}.attn_sub_norm.weight"], eps)                     # Eq. (4)
        x = x + mm(i, "attn_output", y)
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], eps)
        g, u = mm(i, "ffn_gate", h), mm(i, "ffn_up", h)
        a = rms_norm(g / (1 + np.exp(-g)) * u, w[f"blk.{i}.ffn_sub_norm.weight"], eps)   # Eq. (5)
        x = x + mm(i, "ffn_down", a)
    return rms_norm(x, w["output_norm.weight"], eps) @ w["token_embd.weight"].T


def check(path, model):
    """Read `path` back against `model`: every code and Δ equal, every norm and the embedding
    byte-equal; then llama.cpp's graph (NumPy) against our forward with the same weights and
    unquantized activations. Returns {'max_abs_diff', 'logit_std', 'top1_agree', 'positions'}."""
    meta, tensors = read_container(path)
    if meta.get("general.architecture") != ARCH:
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, not {ARCH!r}")
    expect = {n: (a, k, s) for n, a, k, s in tensors_of(model, compact=False)}
    if set(expect) != set(tensors):
        missing, extra = sorted(set(expect) - set(tensors))[:3], sorted(set(tensors) - set(expect))[:3]
        raise ValueError(f"{path}: tensors differ from the checkpoint's: missing {missing}, unexpected {extra}")
    for name, (kind, shape, raw) in tensors.items():
        a = expect[name][0]
        if kind == GGMLType.Q2_0:
            codes, d = q2_0_decode(np.frombuffer(raw, np.uint8), *shape)
            same = np.array_equal(codes.astype(np.float32), a) and np.all(d == 1.0)
        else:
            same = np.frombuffer(raw, np.float32).reshape(shape).tobytes() == np.ascontiguousarray(a).tobytes()
        if not same:
            raise ValueError(f"{path}: tensor {name} differs from the checkpoint's")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (64,), generator=g)
    ours = reference_logits(model, ids)
    theirs = bitnet_forward(meta, weights_from(tensors), ids.numpy())
    r = dict(max_abs_diff=float(np.abs(ours - theirs).max()), logit_std=float(ours.std()),
             top1_agree=int((ours.argmax(-1) == theirs.argmax(-1)).sum()), positions=len(ids))
    if r["max_abs_diff"] > 1e-3 * r["logit_std"]:     # fp32 on both sides: ~1e-6 of the spread
        raise ValueError(f"{path}: llama.cpp's bitnet graph disagrees with our model: max |Δlogit| "
                         f"{r['max_abs_diff']:.3g} (logit std {r['logit_std']:.3g}), "
                         f"top-1 {r['top1_agree']}/{len(ids)}")
    return r


def log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def in_llama_cpp(path, model, n_tokens=64, n_greedy=16, f32_cache=False):
    """The export run by llama.cpp itself (llama-cpp-python, an optional install that builds it):
    logits of the same 64 ids as check(), against our forward with the same weights and unquantized
    activations, and 16 greedy tokens with the KV cache against ours. llama.cpp multiplies an F32 file
    in fp32; for Q2_0 weights its CPU quantizes the activations to 8 bits per block of 32 (Q8_0).
    Its KV cache is fp16 unless f32_cache."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ValueError("--in_llama_cpp needs llama-cpp-python: pip install llama-cpp-python==0.3.36 "
                         "(builds llama.cpp from source, ~10 minutes on 2 cores)") from None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=g)
    cache = dict(type_k=0, type_v=0) if f32_cache else {}                     # GGML_TYPE_F32; default: an F16 KV cache
    llm = Llama(model_path=path, n_ctx=n_tokens + n_greedy + 8, logits_all=True, verbose=False, n_threads=2, **cache)
    llm.eval(ids.tolist())
    theirs = np.array(llm.scores[:n_tokens], np.float32)          # (T, V), a copy: generate() reuses the buffer
    ref = dequantized(model)                                                    # built once: logits and greedy
    with torch.no_grad():
        ours = ref(ids[None])[0].numpy()
    p, q = log_softmax(ours), log_softmax(theirs)
    r = dict(max_abs_diff=float(np.abs(ours - theirs).max()), logit_std=float(ours.std()),
             kl=float((np.exp(p) * (p - q)).sum(-1).mean()),                   # KL(ours || llama.cpp) per position
             top1_agree=int((ours.argmax(-1) == theirs.argmax(-1)).sum()), positions=n_tokens)
    llm.reset()
    prompt = ids[:8].tolist()
    got = [t for _, t in zip(range(n_greedy), llm.generate(prompt, temp=0.0, top_k=1))]
    seq = ids[:8].clone()
    want = []
    for _ in range(n_greedy):                                                    # ours: greedy, full recompute
        with torch.no_grad():
            nxt = int(ref(seq[None])[0, -1].argmax())
        want.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    llm.close()
    return dict(r, greedy_equal=got == want, greedy_ours=want, greedy_llama_cpp=got)


def llama_cpp_greedy(llm):
    """greedy(ids, n, stop) -> up to n new ids, ending before `stop`: llama.cpp's own sampler at temperature 0."""
    def greedy(ids, n, stop):
        out = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t == stop or len(out) == n:
                break
            out.append(t)
        return out
    return greedy


def llama_cpp_task_accuracy(path, model, src, rows=0, f32_cache=False):
    """task_accuracy() with the export run by llama.cpp (KV cache fp16 unless f32_cache)."""
    from llama_cpp import Llama
    from tokenizer import load_tokenizer
    cache = dict(type_k=0, type_v=0) if f32_cache else {}
    llm = Llama(model_path=path, n_ctx=src.args.get("max_len", 64) + 8, verbose=False, n_threads=2, **cache)
    try:
        return task_accuracy(llama_cpp_greedy(llm), model, load_tokenizer(src.tokenizer), src.args["task"], src.args,
                             os.environ.get("BITDISTILL_DATA"), rows)         # distill.py's --data_dir default
    finally:
        llm.close()


def task_accuracy(greedy, model, tok, task, args, data_dir=None, limit=0):
    """The checkpoint's task on its validation rows, as distill.py evaluates it (the same prompts,
    max_len and label words, greedy): the export's predictions from greedy(ids, n, stop) against ours,
    the trained model (int8 per-token activations, Eq. 3) and dequantized(model) (none, what the exact
    file asks for). Returns the three accuracies and how many predictions each pair shares."""
    from contextlib import nullcontext
    from tasks import chat_tokens, encode_prompt, evaluate, get_task, load_examples, stop_token
    spec = get_task(task)
    if spec["kind"] != "cls":
        raise ValueError(f"--task_accuracy: {task} is not a classification task (sst2, mnli, qnli)")
    rows = load_examples(task, "validation", data_dir, limit or None)
    chat = chat_tokens(tok) if args.get("prompt") == "chat" else None
    stop, max_len = stop_token(tok, chat), args.get("max_len", 64)
    gen_len = max(len(tok.encode(("" if chat else " ") + w)) for w in spec["labels"]) + 1   # as tasks.evaluate
    theirs = [tok.decode(greedy(encode_prompt(tok, task, ex, max_len - gen_len, chat), gen_len, stop)) for ex in rows]
    cpu, labels = torch.device("cpu"), [spec["labels"][ex["label"]] for ex in rows]
    ours = {name: evaluate(m, tok, task, rows, max_len, gen_len, 32, cpu, nullcontext(), chat)[2]
            for name, m in (("ours", model), ("ours_dequantized", dequantized(model)))}
    norm = lambda s: (s.strip().split() or [""])[0].strip(".,!").lower()     # tasks.accuracy's match
    right = lambda preds: [norm(p) == norm(l) for p, l in zip(preds, labels)]
    r = {"task": task, "rows": len(rows), "export": 100.0 * np.mean(right(theirs))}
    for name, preds in ours.items():
        r[name] = 100.0 * np.mean(right(preds))
        r[f"export_agrees_with_{name}"] = sum(norm(a) == norm(b) for a, b in zip(theirs, preds))
        d = np.array(right(theirs), float) - np.array(right(preds), float)    # paired, per row
        r[f"export_minus_{name}_ci95"] = [100 * (d.mean() - 1.96 * d.std(ddof=1) / len(d) ** 0.5),
                                          100 * (d.mean() + 1.96 * d.std(ddof=1) / len(d) ** 0.5)]
    return r


@torch.no_grad()
def dequantized(model):
    """A copy of `model` with each BitLinear replaced by an nn.Linear holding Δ·codes: no activation
    quantization, i.e. what the exact file asks llama.cpp to compute."""
    import copy
    m = copy.deepcopy(model).float().eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, BitLinear):
            codes, delta = weight_quant_int(mod.weight, mod.quantizer, mod.eps)
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight.copy_(codes.float() * delta)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, lin)
    return m


@torch.no_grad()
def reference_logits(model, ids):
    """Our forward (model.py) of dequantized(model): (T,) ids -> (T, V) float32."""
    return dequantized(model)(ids[None])[0].numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="a 1.58-bit checkpoint of continue_train.py or distill.py")
    p.add_argument("--out", default=None, help="the GGUF to write (not with --check)")
    p.add_argument("--compact", action="store_true", help="codes as Q2_0 (2.25 bits per weight) instead of F32")
    p.add_argument("--check", default=None, metavar="GGUF", help="only read this export back and compare it")
    p.add_argument("--in_llama_cpp", default=None, metavar="GGUF",
                   help="only run this export in llama.cpp (llama-cpp-python) and compare logits and greedy tokens")
    p.add_argument("--f32_cache", action="store_true",
                   help="--in_llama_cpp: an fp32 KV cache (llama.cpp's default: fp16)")
    p.add_argument("--task_accuracy", action="store_true",
                   help="--in_llama_cpp: also the checkpoint's task (distill.py's --task, prompts, --max_len) on its "
                        "validation rows, in llama.cpp against ours")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="--in_llama_cpp: also write the figures, the inputs and the commit there (strict JSON)")
    p.add_argument("--rows", type=int, default=0, help="--task_accuracy: the first N validation rows (0: all)")
    p.add_argument("--convert", action="store_true",
                   help="--ckpt is a full-precision llama model (smollm2, a .gguf, an HF folder): convert it first "
                        "(stage 1, SubLN before o_proj/down_proj, untrained) to try the path before training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args, started = p.parse_args(argv), time.time()
    if args.json and (not args.in_llama_cpp or os.path.exists(args.json)):
        p.error(f"--json goes with --in_llama_cpp, and {args.json} must not exist yet")
    if sum(a is not None for a in (args.out, args.check, args.in_llama_cpp)) != 1:
        p.error("give exactly one of --out (export), --check and --in_llama_cpp (compare an export)")
    if args.task_accuracy and not args.in_llama_cpp:
        p.error("--task_accuracy goes with --in_llama_cpp GGUF")
    src = read_checkpoint(args.ckpt)
    if args.task_accuracy and not src.args.get("task"):
        raise ValueError(f"--task_accuracy: {args.ckpt} records no task; give a checkpoint of distill.py")
    model = model_from(src).eval()
    if args.convert:
        if model.config.bitnet:
            raise ValueError(f"--convert: {args.ckpt} is already a 1.58-bit model; drop --convert")
        model = convert_to_bitnet(model, subln=True, subln_all=False)
    if args.in_llama_cpp:
        r = in_llama_cpp(args.in_llama_cpp, model, f32_cache=args.f32_cache)
        print(f"export.py: {args.in_llama_cpp} in llama.cpp ({'fp32' if args.f32_cache else 'fp16'} KV cache) vs ours "
              f"on {r['positions']} positions: max |Δlogit| "
              f"{r['max_abs_diff']:.3g} (logit std {r['logit_std']:.3g}), KL {r['kl']:.3g}, top-1 "
              f"{r['top1_agree']}/{r['positions']}; {len(r['greedy_ours'])} greedy tokens "
              f"{'identical' if r['greedy_equal'] else 'differ'}")
        if args.task_accuracy:
            r["task_accuracy"] = llama_cpp_task_accuracy(args.in_llama_cpp, model, src, args.rows, args.f32_cache)
            a = r["task_accuracy"]
            print(f"export.py: {a['task']} validation accuracy on {a['rows']} rows: llama.cpp {a['export']:.2f}, ours "
                  f"{a['ours']:.2f} (int8 activations), ours dequantized {a['ours_dequantized']:.2f}; the same prediction "
                  f"as ours on {a['export_agrees_with_ours']} rows, as ours dequantized on "
                  f"{a['export_agrees_with_ours_dequantized']}")
        print("LLAMACPP " + json.dumps(r))
        if args.json:
            import llama_cpp
            write_json(args.json, {"provenance": provenance(started), "ckpt": args.ckpt, "gguf": args.in_llama_cpp,
                                   "gguf_bytes": os.path.getsize(args.in_llama_cpp), "f32_cache": args.f32_cache,
                                   "llama_cpp_python": llama_cpp.__version__, **r})
        return r
    if args.check:
        r = check(args.check, model)
        print(f"export.py: {args.check} holds the checkpoint's codes, Δ, norms and embedding exactly; llama.cpp's "
              f"bitnet graph (NumPy) vs ours on {r['positions']} positions: max |Δlogit| {r['max_abs_diff']:.3g} "
              f"(logit std {r['logit_std']:.3g}), top-1 {r['top1_agree']}/{r['positions']}")
        return r
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it")
    n = export(model, src.tokenizer, args.out, args.compact)
    print(f"export.py: wrote {args.out} ({n} tensors, {os.path.getsize(args.out) / 1e6:.1f} MB, "
          f"{'Q2_0' if args.compact else 'F32'} codes)")


if __name__ == "__main__":
    run_cli(main)
