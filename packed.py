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
cache holds fp16; the lm_head is fp32 (PyTorch), bf16 or int8 (C kernels). This forward,
op by op, is the readable reference; a decode token (batch 1, bf16/int8 head) runs instead as ONE
C call (decode_cpu.c, ckernels.DecodeStep: every layer and the head, no Python in between), equal
to it bit for bit (test_decode.py); c_decode = False runs the reference.
Not bit-equal to the fake-quantized model (fp32 sums in another order can move an activation
across an int8 rounding boundary), but greedy tokens match and logits are close (test_ternary.py).
The C calls and their argument checks live in ckernels.py; this file holds the modules and a CLI.

    python build_ffi.py                                   # optional: runs on first use anyway
    python packed.py --ckpt out/distill/ckpt.pt --out out/packed.pt      # pack a checkpoint
    python packed.py --load out/packed.pt --prompt "The capital of France is" --tokenizer DIR
    python packed.py --ckpt smollm2 --check            # the real model, ternarised untrained (gguf_model.py)

    from packed import PackedQwen3
    pm = PackedQwen3.from_bitnet(model, head="int8")      # model: a converted (BitLinear) Qwen3
    ids = pm.generate(idx, max_new_tokens=32)             # greedy = the fake-quantized model's
    pm.save("packed.pt"); pm = PackedQwen3.load("packed.pt")
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlinear import BitLinear, check_per_row, weight_quant_int
from ckernels import (DecodeStep, as_matrix, bf16_call, decode_attention, lib, linear_call, pack_ternary, padded_k,
                     qk_norm_rope, rmsnorm)
from model import KVCache, Qwen3Config, RMSNorm, generate, rope_cos_sin
from subln import convert_to_bitnet
from harness import SaveError, atomic_write, nonneg_int, run_cli
from model import model_from, read_checkpoint

FORMAT = "bitdistill-packed-v1"
HEADS = ("fp32", "bf16", "int8")


def _norm_args(norm):
    """(weight, eps) of an RMSNorm module, or (None, 0) for nn.Identity (no SubLN)."""
    return (None, 0.0) if isinstance(norm, nn.Identity) else (norm.weight.detach(), norm.eps)


# ---------------------------------------------------------------------------------------------
# Modules

class PackedLinear(nn.Module):
    """y = x Wᵀ (+ b), W ternary at 2 bits per weight: one BitLinear, or several fused along the
    output dim (q/k/v, gate/up), each keeping its own Δ as the scale of its rows. clamp: Eq. (3) with
    max(γ, ε) (a model trained with --quant_eps clamp), else γ + ε."""

    clamp = False

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
            check_per_row(l.quantizer)
            c, delta = weight_quant_int(l.weight.detach(), l.quantizer, l.eps)   # Δ: () or (N, 1)
            codes.append(c)
            scales.append(delta.float().reshape(-1).expand(l.out_features))
        has_bias = [l.bias is not None for l in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("either all or none of the fused linears may have a bias")
        m = cls(K, sum(l.out_features for l in linears), bias=all(has_bias))
        m.clamp = linears[0].eps == "clamp"
        m.packed.copy_(pack_ternary(torch.cat(codes).contiguous()))
        m.scale.copy_(torch.cat(scales))
        if m.bias is not None:
            m.bias.copy_(torch.cat([l.bias.detach().float() for l in linears]))
        return m

    def forward(self, x, norm=None, swiglu=False):
        """x (..., K) -> (..., N). norm: an RMSNorm (or nn.Identity) applied to x first, in C;
        swiglu: x is (..., 2K) = gate | up and silu(gate)·up is the input (before the norm)."""
        w, eps = _norm_args(norm) if norm is not None else (None, 0.0)
        x2 = as_matrix(x, self.in_features * (2 if swiglu else 1))
        y = linear_call(0, x2, self.packed, None, self.scale, self.in_features, w, eps, swiglu, clamp=self.clamp)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """An int8 lm_head: W ≈ scale[n] · W8[n], scale = max|W[n]|/127 per row (absmax, like Eq. 3 per
    row), activations int8 per token; the same int32-then-one-scale kernel as the ternary one.
    clamp: the activations' ε form, the model's (PackedQwen3.from_bitnet)."""

    clamp = False

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

    def forward(self, x, norm=None):
        w, eps = _norm_args(norm) if norm is not None else (None, 0.0)
        y = linear_call(1, as_matrix(x, self.in_features), self.w8, self.wsum, self.scale, self.in_features,
                        w, eps, False, clamp=self.clamp)
        return y.view(*x.shape[:-1], self.out_features)


class PackedBlock(nn.Module):
    """One decoder layer: attention (fused q/k/v, SubLN, o) and MLP (fused gate/up, SubLN, down)."""

    def __init__(self, c):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        q_dim, kv_dim, I = self.n_head * self.head_dim, self.n_kv_head * self.head_dim, c.intermediate_size
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.subln_all = c.subln_all
        if c.subln_all:   # a SubLN of its own before each of q, k, v, gate, up: five linears, not two fused
            C = c.hidden_size
            self.qkv_parts = nn.ModuleList([PackedLinear(C, n, bias=c.qkv_bias) for n in (q_dim, kv_dim, kv_dim)])
            self.gate_up_parts = nn.ModuleList([PackedLinear(C, I), PackedLinear(C, I)])
            self.in_norms = nn.ModuleList([RMSNorm(C, c.rms_norm_eps) for _ in range(5)])  # q, k, v, gate, up
        else:
            self.qkv = PackedLinear(c.hidden_size, q_dim + 2 * kv_dim, bias=c.qkv_bias)
            self.gate_up = PackedLinear(c.hidden_size, 2 * I)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.attn_subln = RMSNorm(q_dim, c.rms_norm_eps) if c.subln else nn.Identity()   # Eq. (4)
        self.o = PackedLinear(q_dim, c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp_subln = RMSNorm(I, c.rms_norm_eps) if c.subln else nn.Identity()        # Eq. (5)
        self.down = PackedLinear(I, c.hidden_size)

    def project(self, x, norm, which):
        """x (B, T, C) -> the fused projection `which` ("qkv" or "gate_up"), (B, T, sum of outputs).
        Standard SubLN: one C call with the block's RMSNorm fused in. SubLN before all seven: the
        block's RMSNorm (C), then one C call per projection with its own SubLN fused in."""
        if not self.subln_all:
            return getattr(self, which)(x, norm=norm)
        parts, first = (self.qkv_parts, 0) if which == "qkv" else (self.gate_up_parts, 3)
        h = rmsnorm(as_matrix(x.contiguous(), x.shape[-1]), norm.weight.detach(), norm.eps).view(x.shape)  # C
        return torch.cat([lin(h, norm=self.in_norms[first + i]) for i, lin in enumerate(parts)], dim=-1)

    def forward(self, x, cos, sin, cache, layer_idx):
        """x (B, T, C) fp32; cos/sin (B*T, hd). Four C calls (each with its RMSNorm fused in; seven
        with SubLN before all projections), one for q/k norms + RoPE, PyTorch for the cache and attention."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.project(x, self.input_layernorm, "qkv")                # (B, T, (nh+2nkv)*hd)
        qk_w = (None, None) if self.q_norm is None else (self.q_norm.weight.detach(), self.k_norm.weight.detach())
        qk_norm_rope(qkv.view(B * T, -1), nh, nkv, hd, *qk_w, self.eps, cos, sin)  # in place
        q, k, v = qkv.view(B, T, nh + 2 * nkv, hd).transpose(1, 2).split([nh, nkv, nkv], dim=1)  # (B, h, T, hd)
        past = 0   # keys and values are held in fp16 (the cache's dtype): attention always sees them so
        if cache is not None:
            past = cache.length
            cache.k[layer_idx][:, :, past:past + T] = k
            cache.v[layer_idx][:, :, past:past + T] = v
            k, v = cache.k[layer_idx][:, :, :past + T].float(), cache.v[layer_idx][:, :, :past + T].float()
        else:
            k, v = k.half().float(), v.half().float()
        mask = None  # one new token (decode) sees every cached one; a first chunk is plain causal
        if T > 1 and past > 0:  # a later chunk: query i (absolute past+i) sees keys j <= past+i
            mask = torch.arange(past + T)[None, :] <= torch.arange(past, past + T)[:, None]  # (T, S)
        # Eq. (6) with grouped-query attention (kv head h serves query heads h*rep .. h*rep+rep-1)
        if B == T == 1 and cache is not None:  # one decode token: the C attention the C step runs
            y = decode_attention(qkv.view(-1)[:nh * hd], cache.k[layer_idx][0], cache.v[layer_idx][0],
                                 past + 1).view(1, 1, nh * hd)                            # (1, 1, nh*hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and past == 0,
                                               enable_gqa=True)                           # (B, nh, T, hd)
            y = y.transpose(1, 2).reshape(B, T, nh * hd)                                  # (B, T, nh*hd)
        x = x + self.o(y, norm=self.attn_subln)                                           # Eq. (4)
        gate_up = self.project(x, self.post_attention_layernorm, "gate_up")             # (B, T, 2I)
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
        if config.gemma:
            raise ValueError("a Gemma 3 student is not packed: the C decode (decode_cpu.c) lacks its (1 + w) and "
                             "sandwich norms, GeGLU, sliding-window layers and scaled embedding; evaluate it in "
                             "PyTorch (distill.py --eval_only)")
        self.config, self.head_kind = config, head
        self.c_decode, self._step = True, None   # decode tokens in one C call (decode_cpu.c); False: PyTorch
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
        """From a converted (BitLinear) Qwen3, e.g. model.load_model(ckpt) of a distill.py run."""
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
            pb.o = PackedLinear.from_bitlinears(a.o_proj)
            pb.down = PackedLinear.from_bitlinears(mlp.down_proj)
            if c.subln_all:
                lins = (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)
                pb.qkv_parts = nn.ModuleList([PackedLinear.from_bitlinears(l) for l in lins[:3]])
                pb.gate_up_parts = nn.ModuleList([PackedLinear.from_bitlinears(l) for l in lins[3:]])
                for n, l in zip(pb.in_norms, lins):
                    n.weight.copy_(l.in_norm.weight)
            else:
                pb.qkv = PackedLinear.from_bitlinears(a.q_proj, a.k_proj, a.v_proj)
                pb.gate_up = PackedLinear.from_bitlinears(mlp.gate_proj, mlp.up_proj)
            if c.qk_norm:
                pb.q_norm.weight.copy_(a.q_norm.weight)
                pb.k_norm.weight.copy_(a.k_norm.weight)
            if c.subln:
                pb.attn_subln.weight.copy_(a.subln.weight)
                pb.mlp_subln.weight.copy_(mlp.subln.weight)
        return pm.set_eps_form()

    def set_eps_form(self):
        """Eq. (3)'s ε form of the trained model (config.quant_eps) in every int8 product."""
        for mod in self.modules():
            if isinstance(mod, (PackedLinear, Int8Linear)):
                mod.clamp = self.config.quant_eps == "clamp"
        return self

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
            x2 = as_matrix(x.contiguous(), self.config.hidden_size)
            return bf16_call(x2, w, self.norm.weight.detach(), self.norm.eps).view(*x.shape[:-1], -1)
        return F.linear(self.norm(x), w)  # fp32: PyTorch, exactly as the fake-quantized model

    @torch.no_grad()
    def forward(self, idx, cache=None, last_only=False, attention_mask=None):
        """idx (B, T) -> logits (B, T, vocab) fp32, or (B, 1, vocab) with last_only. No padding:
        attention_mask, if given, must be all ones (prompts of equal length)."""
        B, T = idx.shape
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the packed model takes no padding: batch prompts of equal length")
        past = cache.check_room(T) if cache is not None else 0
        if self.c_decode and cache is not None and B == T == 1 and self.head_kind != "fp32":
            # one token, one C call: every layer and the head
            self._step = self._step or DecodeStep(self, self.rope_table)
            logits = self._step(idx[0, 0], cache)                                 # (1, V)
            cache.length += 1
            return logits.view(1, 1, -1)
        pos = torch.arange(past, past + T)[None].expand(B, T)                    # (B, T)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)  # (B, T, hd)
        cos, sin = cos.reshape(B * T, -1).contiguous(), sin.reshape(B * T, -1).contiguous()
        x = self.embed_tokens(idx)                                                # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        return self.logits(x[:, -1:] if last_only else x)   # the final norm is fused into logits

    def _apply(self, fn, *args, **kwargs):
        """.to() / .float() / ... may replace tensors: the C step's pointers are rebuilt on next use."""
        self._step = None
        return super()._apply(fn, *args, **kwargs)

    def rope_table(self, n):
        """cos, sin (n, head_dim) for positions 0..n-1: the rows forward() computes, for the C step."""
        cos, sin = rope_cos_sin(torch.arange(n)[None], self.config.head_dim, self.config.rope_theta)
        return cos[0].contiguous(), sin[0].contiguous()

    def new_cache(self, batch_size, max_len):
        """fp16 keys and values: half of fp32's memory and of the bytes a long-context token reads."""
        return KVCache(self.config, batch_size, max_len, "cpu", torch.float16)

    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, generator=None):
        """model.generate, the one decoding loop: greedy at temperature 0, top-p sampling
        otherwise. Prompts of equal length only (no padding). Returns (B, T + new) ids."""
        return generate(self, idx, max_new_tokens, temperature, top_p, None, eos_token_id, generator)

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
        """Atomic: a failed write (a full disk) leaves the previous file at `path` intact."""
        ckpt = dict(format=FORMAT, config=self.config.to_dict(), head=self.head_kind, state_dict=self.state_dict())
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no packed model at {path}: pack one with `python packed.py --ckpt CKPT --out {path}`")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable packed model ({type(e).__name__}); it may be truncated "
                             "or corrupt: pack it again with `python packed.py --ckpt CKPT --out OUT`") from None
        if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
            raise ValueError(f"{path} is a training checkpoint, not a packed model: use --ckpt {path}")
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"{path} is not a packed model ({FORMAT}); pack one with "
                             "`python packed.py --ckpt CKPT --out OUT`")
        pm = cls(Qwen3Config.from_dict(ckpt["config"]), ckpt["head"])
        pm.load_state_dict(ckpt["state_dict"], strict=True)  # every key and shape checked
        return pm.set_eps_form()


def main():
    ap = argparse.ArgumentParser(description="Pack a 1.58-bit checkpoint for CPU inference, or run a packed one.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="a 1.58-bit distill.py / continue_train.py checkpoint (.pt) to pack; a "
                    "full-precision model (HF folder, .gguf, smollm2) is ternarised untrained")
    ap.add_argument("--out", help="where to write the packed model (--ckpt); nothing is written without it")
    ap.add_argument("--head", default="int8", choices=HEADS,
                    help="embedding table / lm_head precision: fp32 (PyTorch), bf16 or int8 (C kernels)")
    ap.add_argument("--load", help="a packed model (written with --out) to run")
    ap.add_argument("--tokenizer", help="tokenizer folder or .tiktoken; with --ckpt, the one the checkpoint "
                    "records is the default; without any, no text is generated")
    ap.add_argument("--prompt", default="The capital of France is", help="text to continue (greedy)")
    ap.add_argument("--max_new_tokens", type=nonneg_int, default=32, help="tokens to generate")
    ap.add_argument("--check", action="store_true",
                    help="with --ckpt: also run the fake-quantized model and compare the greedy tokens")
    args = ap.parse_args()
    if not args.prompt.strip():
        ap.error("--prompt is empty: give a text to continue")
    import build_ffi
    print(f"packed.py: {build_ffi.describe(lib()[0])}")
    if args.ckpt:
        src = read_checkpoint(args.ckpt)                 # opened once: config, weights, tokenizer
        model = model_from(src).eval()
        args.tokenizer = args.tokenizer or src.tokenizer
        if not model.config.bitnet:                      # a full-precision model (HF, GGUF): stage 1 only
            print(f"{args.ckpt} is full precision: ternarised now (Eq. 1-2, SubLN before all seven projections "
                  "with weight 1, nothing trained: expect noise, not text)")
            convert_to_bitnet(model, subln=True, subln_all=True)
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
    import build_ffi
    run_cli(main, errors=(FileNotFoundError, ValueError, TypeError, SaveError, build_ffi.BuildError))
