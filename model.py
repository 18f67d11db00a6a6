"""
Qwen3 (and Qwen2 / Qwen2.5, and Llama-architecture models such as SmolLM2) in plain PyTorch,
loading Hugging Face checkpoints by hand.

This is the full-precision model that BitNet Distillation starts from (paper section 2, Eq. 6 is
its attention) and that subln.py turns into a 1.58-bit BitNet (Eq. 1-5). Module names mirror the
Hugging Face checkpoint keys (model.layers.0.self_attn.q_proj.weight, ...), so loading is one
explicit key-by-key copy with every key and shape asserted.

    from model import Qwen3, resolve_checkpoint_dir
    from tokenizer import load_tokenizer
    path = resolve_checkpoint_dir("Qwen/Qwen3-0.6B")   # a local folder as is; a hub id is downloaded
    model = Qwen3.from_pretrained(path)
    tok = load_tokenizer(path)
    out = model.generate(torch.tensor([tok.encode("Hello")]), max_new_tokens=20)

Differences between the four families, all read from config.json (or a GGUF's metadata, gguf_model.py):
    qwen3: RMSNorm on each head's q and k (q_norm, k_norm), no q/k/v bias, explicit head_dim
    qwen2: q/k/v bias, no q/k norm, head_dim = hidden_size // num_attention_heads
    llama: Qwen2's block without the biases (SmolLM2, Llama)
    gemma3_text (Gemma 3 1B, Table 3): Qwen3's attention plus
        - RMSNorm as x / rms(x) * (1 + w), computed in fp32 and cast at the end (weights start at 0)
        - four norms a block ("sandwich"): input_layernorm -> attention -> post_attention_layernorm ->
          residual add, pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> residual add
          (Qwen's post_attention_layernorm is the norm BEFORE its MLP: the same key, another place)
        - GeGLU: gelu_tanh(x W_gate) * (x W_up) in place of SiLU
        - scores scaled by 1/sqrt(query_pre_attn_scalar) in place of 1/sqrt(head_dim)
        - five of every six layers attend to the last `sliding_window` keys only (self included),
          with their own RoPE base (10,000; the global layers: 1,000,000)
        - the embedding times sqrt(hidden_size), rounded to the weight's dtype (33.94 in fp32 at 1152,
          34.0 in bf16); the tied lm_head reads the unscaled table
        - no soft-capping in Gemma 3 (Gemma 2 had it): a config that sets it is refused, never ignored
Padding: `attention_mask` (B, T) has 1 for real tokens, 0 for padding. Left and right padding are
both correct in forward (positions come from the mask); generate() expects left padding.

Any checkpoint, ours included (full precision or 1.58-bit): model = load_model(path), at the end.
"""
import contextlib
import json
import os
from dataclasses import dataclass, asdict, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import hub_reason


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    qkv_bias: bool = False       # qwen2: True
    qk_norm: bool = True         # qwen3: True
    model_type: str = "qwen3"
    bitnet: bool = False         # set by subln.convert_to_bitnet: linears are BitLinear
    subln: bool = False          # set by subln.convert_to_bitnet: SubLN before o_proj and down_proj
    subln_all: bool = False      # ... and before q/k/v/gate/up too (the authors' released runs)
    hidden_act: str = "silu"     # gemma3_text: "gelu_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None   # gemma3_text: scores / sqrt(this) (None: / sqrt(head_dim))
    sliding_window: int | None = None            # gemma3_text: a sliding layer sees this many keys, itself included
    layer_types: list | None = None              # gemma3_text: "sliding_attention" | "full_attention" a layer
    rope_local_theta: float | None = None        # gemma3_text: the sliding layers' RoPE base
    weight_quant: str = "absmean"  # set by subln.convert_to_bitnet: Table 4's weight quantizer (bitlinear.py)
    quant_eps: str = "add"       # ... and the ε form of both quantizers: "add" (Eq. 1, 3) or "clamp" (authors)

    @property
    def gemma(self):             # Gemma's norms, sandwich block and scaled embedding (the docstring above)
        return self.model_type == "gemma3_text"

    @classmethod
    def from_hf(cls, d):
        """From the dict of a Hugging Face config.json (model_type qwen3, qwen2, llama or gemma3_text)."""
        mt = d.get("model_type")
        if mt == "gemma3_text":
            return cls.gemma3_from_hf(d)
        if mt not in ("qwen3", "qwen2", "llama"):
            raise ValueError(f"unsupported model_type {mt!r}: this loader knows 'qwen3' (Qwen3), "
                             "'qwen2' (Qwen2, Qwen2.5), 'llama' (SmolLM2, Llama) and 'gemma3_text' (Gemma 3 1B). "
                             "Pick one of those.")
        if mt == "llama" and (d.get("mlp_bias") or d.get("attention_bias") or d.get("pretraining_tp", 1) != 1):
            raise ValueError("llama options mlp_bias / attention_bias / pretraining_tp are not implemented")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_scaling type {rope_type!r} is not implemented (only plain RoPE).")
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        n_head = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_head, num_key_value_heads=d.get("num_key_value_heads", n_head),
            head_dim=d.get("head_dim") or d["hidden_size"] // n_head, rope_theta=float(theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            qkv_bias=(mt == "qwen2") or bool(d.get("attention_bias", False)),
            qk_norm=(mt == "qwen3"), model_type=mt)

    @classmethod
    def gemma3_from_hf(cls, d):
        """Gemma 3's text config: the hub's (rope_theta, rope_local_base_freq, sliding_window_pattern) or
        the one transformers 5 writes (rope_parameters and layer_types); what this model lacks is refused."""
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if d.get(key) is not None:
                raise ValueError(f"{key} = {d[key]}: logit soft-capping is not implemented (Gemma 3 sets none); "
                                 "refused rather than ignored")
        for key in ("use_bidirectional_attention", "attention_bias"):
            if d.get(key):
                raise ValueError(f"gemma3_text with {key} is not implemented")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"gemma3_text activation {act!r} is not implemented (only gelu_pytorch_tanh)")
        n = d["num_hidden_layers"]
        every = d.get("sliding_window_pattern", 6)   # the hub's: every 6th layer global
        types = d.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                         for i in range(n)]
        if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types {types} do not name {n} sliding_attention / full_attention layers")
        rope = d.get("rope_parameters") or {}
        full, local = (rope.get("full_attention") or {}, rope.get("sliding_attention") or {}) \
            if "full_attention" in rope or "sliding_attention" in rope else (d.get("rope_scaling") or rope, {})
        for r in (full, local):
            if r.get("rope_type", r.get("type", "default")) != "default":
                raise ValueError(f"rope scaling {r} is not implemented (Gemma 3 1B has none; 4B and up scale "
                                 "the global layers)")
        head_dim = d.get("head_dim", 256)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=n, num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]), head_dim=head_dim,
            rope_theta=float(full.get("rope_theta", d.get("rope_theta", 1e6))),
            rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", 1e4))),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=d.get("tie_word_embeddings", True),
            max_position_embeddings=d.get("max_position_embeddings", 131072), qkv_bias=False, qk_norm=True,
            model_type="gemma3_text", hidden_act="gelu_tanh",
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", head_dim)),
            sliding_window=d.get("sliding_window", 4096), layer_types=list(types))

    @classmethod
    def from_dict(cls, d):
        """From one of our own checkpoints' asdict(config); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}: checkpoint from another version?")
        return cls(**d)

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as Qwen does (cast, then weighted).
    one_plus (Gemma): y = x / sqrt(mean(x^2) + eps) * (1 + weight), all in fp32, cast at the end."""

    def __init__(self, dim, eps=1e-6, one_plus=False):
        super().__init__()
        self.eps, self.one_plus = eps, one_plus
        self.weight = nn.Parameter(torch.zeros(dim) if one_plus else torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rope_cos_sin(pos, head_dim, theta):
    """pos: (B, T) integer positions -> cos, sin: (B, T, head_dim) in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim))
    angles = pos.float()[..., None] * inv_freq                 # (B, T, head_dim/2)
    emb = torch.cat([angles, angles], dim=-1)                  # (B, T, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotary embedding, 'rotate half' layout (first half pairs with second half).
    x: (B, nh, T, hd), cos/sin: (B, T, hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class HeadLogits:
    """The logits lm_head(h), (B, T, V), never held whole: indexing and reshaping act on the hidden
    states h (B, T, C), and .float() computes only the rows selected by then. Built from forward(head=False)'s
    h (distill.forward_both); losses.chunked_sum then applies the head chunk by chunk inside its checkpoint,
    so a 262,144-token vocabulary (Gemma 3) costs one chunk's logits at a time, never 32 x 512 x V floats."""

    def __init__(self, hidden, head, ctx=None):     # ctx: the forward's autocast, for the head too
        self.hidden, self.head, self.ctx = hidden, head, ctx or contextlib.nullcontext()
        self.shape = (*hidden.shape[:-1], head.weight.shape[0])

    def __getitem__(self, key):           # key indexes positions only: [:, :-1], [b, t0:t1], [sel]
        return HeadLogits(self.hidden[key], self.head, self.ctx)

    def reshape(self, *shape):            # (..., V) -> the hidden states as (..., C)
        assert shape[-1] == self.shape[-1]
        return HeadLogits(self.hidden.reshape(*shape[:-1], self.hidden.shape[-1]), self.head, self.ctx)

    def float(self):
        with self.ctx:
            return self.head(self.hidden).float()


class KVCache:
    """Pre-allocated keys/values for every layer: (B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0  # tokens already stored
        self.max_len = max_len

    def check_room(self, T):
        """Before a forward of T new tokens: the cache must hold them. Returns the tokens already stored."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length + T} requested")
        return self.length


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if self.n_head % self.n_kv_head:
            raise ValueError(f"num_attention_heads {self.n_head} is not a multiple of "
                             f"num_key_value_heads {self.n_kv_head}")
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_head * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_head * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.gemma)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.gemma)
        self.qk_norm = c.qk_norm
        self.scale = (c.query_pre_attn_scalar or self.head_dim) ** -0.5   # Eq. (6)'s 1/sqrt(d)
        self.subln = nn.Identity()  # Eq. (4): subln.py puts SubLN here, right before o_proj

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, return_qkv=False, qk_after_rope=True):
        """x (B, T, C) -> (B, T, C); with return_qkv also (Q, K, V) of this layer for Eq. (10):
        after q/k-norm and before the GQA repeat; Q and K after RoPE (as the authors' code hands
        them to L_AD) or before it (qk_after_rope=False)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        qkv = (q, k, v)  # Eq. (10): A ~ {Q, K, V}, before the GQA repeat
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if qk_after_rope:
            qkv = (q, k, v)
        if cache is not None:
            s = cache.length
            cache.k[layer_idx][:, :, s:s + T] = k
            cache.v[layer_idx][:, :, s:s + T] = v
            k, v = cache.k[layer_idx][:, :, :s + T], cache.v[layer_idx][:, :, :s + T]
        # grouped-query attention: query head h reads kv head h // (nh / nkv)
        rep = self.n_head // self.n_kv_head
        k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(rep, dim=1)
        # Eq. (6): softmax(Q K^T / sqrt(d)) V, with the causal + padding (+ sliding window) mask; mask None (no padding,
        # and no cache or one new token): plain causal, which SDPA's fused (flash) kernels take. One
        # new token after a cache sees every key (SDPA's causal mask is aligned top-left); the test
        # is on the cache, not on T, which torch.compile may hold as a symbol.
        causal = mask is None and (cache is None or cache.length == 0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        y = self.o_proj(self.subln(y))
        return (y, qkv) if return_qkv else y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.subln = nn.Identity()  # Eq. (5): subln.py puts SubLN here, right before down_proj
        self.gelu = config.hidden_act == "gelu_tanh"   # Gemma's GeGLU

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(self.subln(g * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, eps, g = config.hidden_size, config.rms_norm_eps, config.gemma
        self.input_layernorm = RMSNorm(C, eps, g)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(C, eps, g)   # Qwen: before the MLP; Gemma: after the attention
        if g:
            self.pre_feedforward_layernorm = RMSNorm(C, eps, g)
            self.post_feedforward_layernorm = RMSNorm(C, eps, g)
        self.sandwich = g
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0, return_qkv=False, qk_after_rope=True):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx, return_qkv, qk_after_rope)
        a, qkv = a if return_qkv else (a, None)
        if self.sandwich:          # Gemma: each sublayer's output is normed before the residual add
            x = x + self.post_attention_layernorm(a)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, qkv) if return_qkv else x


class Qwen3(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two uses

    def forward(self, idx, attention_mask=None, cache=None, last_only=False, qkv_layer=None, qk_after_rope=True,
                head=True):
        """idx: (B, T) token ids; attention_mask: (B, past + T) with 1 = real token, or None.
        Returns logits (B, T, vocab), or (B, 1, vocab) with last_only; with head=False the final
        hidden states (B, T, C) instead (HeadLogits applies the head later, where a loss reads it). With qkv_layer=i, returns
        (logits, (Q, K, V)) of layer i: the states Eq. (10) distils, each (B, heads, T, head_dim),
        Q and K after RoPE unless qk_after_rope=False."""
        B, T = idx.shape
        past = cache.check_room(T) if cache is not None else 0
        fused = attention_mask is None and (past == 0 or T == 1)   # no padding: no mask tensor at all
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected (batch, past + T) = {(B, past + T)}")
        keep = attention_mask.bool()                                              # (B, S)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]       # (B, T)
        c = self.config
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta)
        # mask[b, 0, i, j]: query i (absolute past+i) may see key j if j <= past+i and j is real;
        # a padded query also sees itself, so its softmax row is never empty (its output is unused).
        # A sliding layer (Gemma) also needs j > past+i - window.
        S = past + T
        qpos = torch.arange(past, S, device=idx.device)[:, None]                  # (T, 1)
        kpos = torch.arange(S, device=idx.device)[None, :]                         # (1, S)

        def build_mask(window=None):
            see = kpos <= qpos if window is None else (kpos <= qpos) & (kpos > qpos - window)   # (T, S)
            mask = see[None] & keep[:, None, :]                                   # (B, T, S)
            return (mask | (kpos == qpos)[None])[:, None]                         # (B, 1, T, S)
        mask = None if fused else build_mask()       # fused: SDPA's own causal mask, nothing built
        ctx = {"full_attention": (cos, sin, mask)}
        if c.layer_types and "sliding_attention" in c.layer_types:
            local_cos, local_sin = rope_cos_sin(pos, c.head_dim, c.rope_local_theta)
            ctx["sliding_attention"] = (local_cos, local_sin, mask if S <= c.sliding_window
                                        else build_mask(c.sliding_window))   # every key in the window: no change
        x = self.model.embed_tokens(idx)                                          # (B, T, C)
        if c.gemma:      # sqrt(hidden) rounded to the weight's dtype, as Gemma's checkpoints were trained
            x = x * torch.tensor(c.hidden_size ** 0.5).to(x.dtype)
        qkv = None
        for i, block in enumerate(self.model.layers):
            cos_i, sin_i, mask_i = ctx[c.layer_types[i] if c.layer_types else "full_attention"]
            if i == qkv_layer:
                x, qkv = block(x, cos_i, sin_i, mask_i, cache, i, return_qkv=True, qk_after_rope=qk_after_rope)
            else:
                x = block(x, cos_i, sin_i, mask_i, cache, i)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x) if head else x
        return logits if qkv_layer is None else (logits, qkv)

    def new_cache(self, batch_size, max_len):
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, attention_mask=None,
                 eos_token_id=None, generator=None):
        """Greedy at temperature 0, nucleus (top-p) sampling otherwise; model.generate below."""
        return generate(self, idx, max_new_tokens, temperature, top_p, attention_mask, eos_token_id, generator)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """A Hugging Face Qwen3/Qwen2/Llama/Gemma 3 checkpoint (folder, or hub id fetched with huggingface_hub)."""
        path = resolve_checkpoint_dir(path)
        with open(os.path.join(path, "config.json")) as f:
            config = Qwen3Config.from_hf(json.load(f))
        sd = read_safetensors(path)
        model = cls(config)
        load_hf_state_dict(model, sd, path)
        return model.to(dtype)


def load_hf_state_dict(model, sd, path):
    """Copies a checkpoint's {Hugging Face key: tensor} into model, strictly: the same keys, every
    shape asserted. Tied embeddings: our lm_head.weight *is* embed_tokens.weight; the checkpoint may
    or may not repeat it under lm_head.weight (if it does, it must be the same tensor)."""
    config, ours = model.config, model.state_dict()
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight")
        if "lm_head.weight" in sd:
            if not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
                raise ValueError("tie_word_embeddings is true but lm_head.weight differs from "
                                 "model.embed_tokens.weight in the checkpoint")
            sd.pop("lm_head.weight")
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the {config.model_type} architecture: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    with torch.no_grad():
        for k, v in ours.items():  # one explicit copy per key, every shape asserted
            if sd[k].shape != v.shape:
                raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(sd[k].shape)}, "
                                 f"model {tuple(v.shape)} (is the config from the same model?)")
            v.copy_(sd[k])


# ----------------------------------------------------------------------------- every checkpoint, one loader
# load_model(path) opens any model path once and builds it strictly: an HF folder or hub id
# (from_pretrained above), a llama.cpp GGUF (gguf_model.py), or a .pt that continue_train.py or
# distill.py wrote (a plain dict: model, config, optimizer, step, args, rng), converted to BitNet
# first when its config says so (subln.build_model).

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # an HF folder that has one of these has its tokenizer
# Checkpoints written before the RNG state was stored as lists hold one numpy array (numpy's RNG
# keys); these are the only globals beyond torch's own that weights_only=True lets through.
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                      getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def load_checkpoint(path):
    """One of our checkpoint dicts, on CPU, read with weights_only=True: a .pt is a pickle, and a
    crafted one would otherwise run code. Clear errors for a missing, unreadable or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: check the path (or train first, "
                                "e.g. with continue_train.py --out_dir ...)")
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({why}); it may be truncated or corrupt, or not a "
                         "bitdistill checkpoint (only tensors and plain values are loaded)") from None
    if isinstance(ckpt, dict) and ckpt.get("format", "").startswith("bitdistill-packed"):
        raise ValueError(f"{path} is a packed model (packed.py --out): run it with packed.py --load")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a bitdistill checkpoint (needs 'model' and 'config' keys)")
    missing = [k for k in CONFIG_KEYS if k not in (ckpt["config"] or {})]
    if missing:
        raise ValueError(f"{path} has an incomplete 'config' (missing {', '.join(missing)}): it is not a "
                         "checkpoint this project wrote, or it was damaged")
    return ckpt


@dataclass
class Checkpoint:
    """What a model path holds, read once. kind "hf": a Hugging Face folder (a hub id is downloaded to one);
    "gguf": a llama.cpp file (gguf_model.py); "ours": a .pt of continue_train.py or distill.py, its dict `ckpt`."""
    path: str                 # the file, or the resolved HF folder
    kind: str                 # "hf", "gguf" or "ours"
    config: Qwen3Config       # .bitnet / .subln say whether it is already a 1.58-bit model
    tokenizer: str | None     # the tokenizer that belongs to it (None: not recorded)
    ckpt: dict | None = None  # kind "ours" only

    @property
    def args(self):
        return (self.ckpt or {}).get("args", {})


def read_checkpoint(path):
    """Open a model path once: our .pt (torch.load), a GGUF (its tokenizer inside) or an HF folder / hub id."""
    from gguf_model import gguf_source, is_gguf
    if is_gguf(path):
        return Checkpoint(*gguf_source(path))
    if os.path.isfile(path) or path.endswith(".pt"):
        ckpt = load_checkpoint(path)
        return Checkpoint(path, "ours", Qwen3Config.from_dict(dict(ckpt["config"])),
                          ckpt.get("args", {}).get("tokenizer"), ckpt)
    folder = resolve_checkpoint_dir(path)
    with open(os.path.join(folder, "config.json")) as f:
        config = Qwen3Config.from_hf(json.load(f))
    has_tok = any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)
    return Checkpoint(folder, "hf", config, os.path.abspath(folder) if has_tok else None)


def model_from(src, dtype=torch.float32):
    """The model of a read_checkpoint(): every key and shape checked (strict)."""
    from gguf_model import load_gguf   # gguf_model.py and subln.py build on this file
    from subln import build_model
    if src.kind in ("hf", "gguf"):
        return (Qwen3.from_pretrained if src.kind == "hf" else load_gguf)(src.path, dtype=dtype)
    model = build_model(src.config)            # BitLinear + SubLN in place when the config says so
    ours, theirs = set(model.state_dict()), set(src.ckpt["model"])
    if ours != theirs:
        miss, extra = sorted(ours - theirs), sorted(theirs - ours)
        raise ValueError(f"{src.path}: its weights do not fit its config ({len(miss)} missing, e.g. {miss[:2]}; "
                         f"{len(extra)} unexpected, e.g. {extra[:2]}): the file is damaged or from another version")
    try:
        model.load_state_dict(src.ckpt["model"], strict=True)
    except RuntimeError as e:                  # a shape that does not fit
        raise ValueError(f"{src.path}: {str(e).splitlines()[-1].strip()[:300]}") from None
    return model.to(dtype)


def load_model(path, dtype=torch.float32):   # an HF checkpoint (folder or hub id) or our .pt, strictly
    return model_from(read_checkpoint(path), dtype)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_p=1.0, attention_mask=None,
             eos_token_id=None, generator=None):
    """The one decoding loop, for Qwen3 and packed.PackedQwen3 alike (both have new_cache and
    forward(idx, attention_mask, cache, last_only)). Greedy at temperature 0, nucleus (top-p)
    sampling otherwise. Batched prompts must be left-padded (attention_mask 0 on the left).
    Returns (B, T + new) ids; rows that hit eos_token_id keep emitting eos."""
    B, T = idx.shape
    cache = model.new_cache(B, T + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    logits = model(idx, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    out = [idx]
    for i in range(max_new_tokens):
        nxt = sample(logits.float(), temperature, top_p, generator)                        # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break                                      # no forward for a token nobody will read
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        logits = model(nxt[:, None], attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]
    return torch.cat(out, dim=1)


def sample(logits, temperature, top_p, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0: argmax; else softmax(logits/T) cut to the
    smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p   # tokens entirely beyond the nucleus
        sp[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def resolve_checkpoint_dir(path):
    """A local folder as is; anything else is treated as a hub id and downloaded."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: is it a Hugging Face checkpoint folder?")
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; from_pretrained wants a checkpoint folder or a hub id")
    if path.count("/") != 1:
        raise FileNotFoundError(f"no checkpoint folder at {path!r} (and it is not a hub id like 'Qwen/Qwen3-0.6B')")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, no huggingface_hub ...
        raise FileNotFoundError(f"could not download {path!r} from the Hugging Face hub ({hub_reason(e)}). Without "
                                "internet, pass a local checkpoint folder, or run the whole pipeline at toy scale: "
                                "python toy.py") from None


def read_safetensors(path):
    """All tensors of a checkpoint folder: one model.safetensors, or the shards listed in
    model.safetensors.index.json."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    sd = {}
    for fn in files:
        fp = os.path.join(path, fn)
        if not os.path.exists(fp):
            raise FileNotFoundError(f"shard {fn} listed in the index is missing from {path}")
        sd.update(load_file(fp))
    if weight_map is not None and set(weight_map) != set(sd):
        raise ValueError(f"the shards of {path} do not hold exactly the keys of its index")
    return sd
