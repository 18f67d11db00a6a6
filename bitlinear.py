"""
BitLinear: the 1.58-bit linear layer of BitNet b1.58, as used by BitNet Distillation.

Paper section 2 (Preliminaries), arXiv 2510.13998:
  Eq. (1)-(2)  weights   -> ternary {-1, 0, +1} times one per-tensor scale Δ = mean|W|  (absmean)
  Eq. (3)      activations -> int8 per token, scale γ = max|X| over the hidden dim       (absmax)
  STE          gradients pass straight through both RoundClips.
  Table 4      the other weight quantizers of the authors' code (block, perchannel, "gptq", "awq").

ε, two forms (recipe item quant_eps): the paper's Eq. (1) and (3) divide by Δ + ε and γ + ε
("add"); the authors' code (and bitnet.cpp's activation quantizer) divides by max(Δ, ε) and
max(γ, ε) ("clamp"), as a multiplier s = 1/max(Δ, ε), and de-quantizes as RoundClip(W·s)/s. The
codes differ where W/Δ sits at a rounding threshold (~1e-4 of them) and, for a tensor whose mean
|w| is below ε, so do the levels (±ε against ±mean|w|).

Two forms of each quantizer live here:
  * the float ("fake-quantized") form used for training: it returns de-quantized floats, so the
    matmul is an ordinary F.linear and autograd works through the straight-through estimator;
  * the integer form (ternary codes + Δ, int8 + γ) that packed inference (ternary_cpu.c) uses.
    y = (x_int8 @ w_ternary^T) * (γ/127) * Δ equals the fake-quantized F.linear up to float rounding.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # ε in Eq. (1) and (3)


# Eq. (2): RoundClip(Y, a, b) = min(max(round(Y), a), b)
def round_clip(y, a, b):
    return torch.clamp(torch.round(y), a, b)


WEIGHT_QUANTS = ("absmean", "block", "perchannel", "gptq", "awq")   # Table 4 (absmean: Eq. 1-2)
QUANT_EPS = ("add", "clamp")                                         # the paper's ε / the authors' clamp
BLOCK = 256                    # weights per scale of "block", in the flattened tensor (blocks run across rows)


def as_blocks(w):
    """(N, K) -> (ceil(N K / 256), 256): the flattened tensor, zero-padded to whole blocks (the pads count
    in the last block's mean, as in the authors' code)."""
    flat = w.reshape(-1)
    pad = -flat.numel() % BLOCK
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK)


def from_blocks(u, w):
    return u.reshape(-1)[:w.numel()].view(w.shape)


# Table 4's quantizers as the authors' code computes them (core.py of their release, chosen by
# --weight_quant_method): a multiplier s (their `scale`, Δ = 1/s), every mean clamped at ε, then
# Q_w(W) = RoundClip(W·s, -1, 1) / s. None of them sees data: "gptq" and "awq" carry the names of the
# calibrated methods but are functions of W alone (no Hessian of activations, no activations).
def weight_multiplier(w, method):
    """s for w (N, K) float32: () per tensor, (N, 1) per row, (blocks, 1) per block of as_blocks(w)."""
    a = w.abs()
    absmean = lambda: 1.0 / a.mean().clamp(min=EPS)                              # Eq. (1) with the clamp
    if method == "absmean" or (method == "gptq" and w.shape[1] == 1):
        return absmean()
    if method == "perchannel":    # one absmean per output row
        return 1.0 / a.mean(dim=1, keepdim=True).clamp(min=EPS)
    if method == "block":         # one absmean per block of 256 consecutive weights
        return 1.0 / as_blocks(a).mean(dim=1, keepdim=True).clamp(min=EPS)
    if method == "gptq":          # absmean's s times the mean over columns of 1/std(column): the "Hessian
        inv_std = 1.0 / (w.var(dim=0, keepdim=True) + 1e-8).sqrt()             # diagonal" is the (unbiased)
        return inv_std.mean() / a.mean().clamp(min=EPS)                        # variance of W's columns (1, K)
    check_quantizer(method, "clamp")
    # awq: rows whose mean|w| is above the 80th percentile of rows ("important channels") get 0.7
    # absmean's s, the others 1.2 (N, 1)
    importance, base = a.mean(dim=1, keepdim=True), absmean()
    return torch.where(importance > importance.quantile(0.8), base * 0.7, base * 1.2)


def check_per_row(method):
    """The packed kernels hold one scale per output row: every quantizer but block."""
    if method == "block":
        raise ValueError("--weight_quant block has a scale per 256 weights, not per output row: the packed "
                         "kernels run one scale per row (absmean, gptq, perchannel, awq)")


def check_quantizer(method, eps):
    if method not in WEIGHT_QUANTS:
        raise ValueError(f"--weight_quant must be one of {', '.join(WEIGHT_QUANTS)}, got {method!r}")
    if eps not in QUANT_EPS:
        raise ValueError(f"--quant_eps must be add or clamp, got {eps!r}")
    if method != "absmean" and eps == "add":
        raise ValueError(f"--weight_quant {method} exists only in the authors' code, with its clamp: "
                         "use --quant_eps clamp (the paper's ε form is Eq. 1's absmean)")


# Eq. (1)-(2), integer form: codes = RoundClip(W / (Δ+ε), -1, 1), Δ = mean(|W|); clamp form:
# codes = RoundClip(W·s, -1, 1), Δ = 1/s (weight_multiplier)
def weight_quant_int(w, method="absmean", eps="add"):
    """Returns (codes int8 in {-1,0,1} with w's shape, Δ float32: 0-dim per tensor, (N, 1) per row, or
    (blocks, 1) per block of as_blocks(w) for "block")."""
    check_quantizer(method, eps)
    w = w.float()
    if eps == "add":
        delta = w.abs().mean()
        return round_clip(w / (delta + EPS), -1, 1).to(torch.int8), delta
    s = weight_multiplier(w, method)
    wb = as_blocks(w) if method == "block" else w
    codes = round_clip(wb * s, -1, 1).to(torch.int8)
    return (from_blocks(codes, w) if method == "block" else codes), 1.0 / s


# Eq. (1): Q_w(W) = Δ · RoundClip(W / (Δ+ε), -1, 1)   (de-quantized float), what BitLinear.forward runs;
# clamp form: RoundClip(W·s, -1, 1) / s, for every quantizer of Table 4.
# The arithmetic is float32 whatever W's dtype (the result comes back in W's dtype), so the codes
# are weight_quant_int's, the ones packed inference uses. FUSED (below) picks the form: the
# reference, one line per symbol, or the same values with fewer passes over memory.
def weight_quant(w, method="absmean", eps="add"):
    if FUSED and method == "absmean":
        return weight_quant_fused(w, eps)
    wf = w.float()
    if eps == "add":
        delta = wf.abs().mean()
        return (delta * round_clip(wf / (delta + EPS), -1, 1)).to(w.dtype)
    s = weight_multiplier(wf, method)
    if method == "block":
        return from_blocks(round_clip(as_blocks(wf) * s, -1, 1) / s, wf).to(w.dtype)
    return (round_clip(wf * s, -1, 1) / s).to(w.dtype)


# Eq. (3), integer form: q = RoundClip(127/(γ+ε) · X, -128, 127), γ = max|X| per token;
# clamp form: q = RoundClip(X · 127/max(γ, ε), -128, 127) and the token's scale max(γ, ε)/127
def activation_quant_int(x, eps="add"):
    """Returns (q int8 with x's shape, γ float32 of shape x.shape[:-1] + (1,)): X ≈ q · γ/127."""
    x = x.float()
    gamma = x.abs().amax(dim=-1, keepdim=True)  # (..., 1): one scale per token
    if eps == "clamp":
        gamma = gamma.clamp(min=EPS)
        return round_clip(x * (127.0 / gamma), -128, 127).to(torch.int8), gamma
    q = round_clip(x * (127.0 / (gamma + EPS)), -128, 127).to(torch.int8)
    return q, gamma


# Eq. (3): Q_INT8(X) = γ/127 · RoundClip(127/(γ+ε) · X, -128, 127)   (de-quantized float);
# clamp form: RoundClip(X·s, -128, 127) / s, s = 127/max(γ, ε) (the authors' activation_quant).
# Float32 arithmetic as above: under bf16 autocast, bf16 arithmetic would round 127/(γ+ε)·X to a
# multiple of 0.5 above 64 before RoundClip, and train on codes inference never sees.
def activation_quant(x, eps="add"):
    if FUSED:
        return activation_quant_fused(x, eps)
    xf = x.float()
    gamma = xf.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    if eps == "clamp":
        s = 127.0 / gamma.clamp(min=EPS)
        return (round_clip(xf * s, -128, 127) / s).to(x.dtype)
    return (gamma / 127.0 * round_clip(xf * (127.0 / (gamma + EPS)), -128, 127)).to(x.dtype)


# The fused forms: the same values as the reference lines above, bit for bit (test_speed), with
# fewer passes over memory. The reference activation quantizer makes 5 tensors the size of X
# (|X|, the scaled X, its rounding, the clip, the product); this one makes 1 and rounds, clips and
# rescales it in place (a bf16 X adds, to both, its fp32 copy and the cast back). Under
# torch.compile the whole of it becomes one reduction and one elementwise kernel: X read twice,
# Q(X) written once. No autograd graph is built (no_grad): the STE below supplies the gradient.
# Like nanoGPT's flash/manual switch: FUSED = False runs the reference lines everywhere.
FUSED = True


@torch.no_grad()
def weight_quant_fused(w, eps="add"):
    wf = w.float()                                                      # no copy when W is fp32
    a = wf.abs()                                                        # (N, K), the one new tensor
    delta = a.mean()
    if eps == "clamp":
        s = 1.0 / delta.clamp(min=EPS)
        return torch.mul(wf, s, out=a).round_().clamp_(-1, 1).div_(s).to(w.dtype)
    q = torch.div(wf, delta + EPS, out=a)                               # reuses |W|'s memory
    return q.round_().clamp_(-1, 1).mul_(delta).to(w.dtype)


@torch.no_grad()
def activation_quant_fused(x, eps="add"):
    xf = x.float()
    gamma = torch.maximum(xf.amax(dim=-1, keepdim=True), -xf.amin(dim=-1, keepdim=True))  # (..., 1) = max|X|
    if eps == "clamp":
        s = 127.0 / gamma.clamp(min=EPS)
        return (xf * s).round_().clamp_(-128, 127).div_(s).to(x.dtype)
    q = xf * (127.0 / (gamma + EPS))                                    # the one new tensor (fp32)
    return q.round_().clamp_(-128, 127).mul_(gamma / 127.0).to(x.dtype)


# Straight-through estimator: forward uses q = Q(x) exactly, backward sees the identity dQ/dx = 1.
# (The usual x + (q - x).detach() costs two more passes over x and is q only up to float rounding.)
class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(x, q):
    return _STE.apply(x, q)


class BitLinear(nn.Linear):
    """Drop-in nn.Linear whose forward is F.linear(Q_INT8(x), Q_w(W)) with STE gradients.
    The latent full-precision weight is what the optimizer updates (and what checkpoints hold).
    in_norm: an optional SubLN on the input, before Eq. (3); subln.py sets it on q/k/v/gate/up
    when SubLN goes before all seven projections (the authors' released runs).
    step_weight: Q_w(W) kept for the rest of one optimizer step inside weight_quant_once(), else None.
    quantizer, eps: the weight quantizer of Table 4 (absmean = Eq. 1-2) and the ε form of both
    quantizers (config.weight_quant / config.quant_eps, set by subln.bitnet_layers)."""

    def __init__(self, *args, quantizer="absmean", eps="add", **kw):
        super().__init__(*args, **kw)
        check_quantizer(quantizer, eps)
        self.register_module("in_norm", None)
        self.once_per_step, self.step_weight = False, None
        self.quantizer, self.eps = quantizer, eps

    def forward(self, x):
        if self.in_norm is not None:
            x = self.in_norm(x)
        q = self.step_weight
        if q is None:
            q = weight_quant(self.weight, self.quantizer, self.eps)   # Eq. (1)-(2)
            if self.once_per_step:
                self.step_weight = q
        w = ste(self.weight, q)
        x = ste(x, activation_quant(x, self.eps))                     # Eq. (3)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_linear(cls, linear, quantizer="absmean", eps="add"):
        """A BitLinear holding the same latent weight (and bias) as `linear`."""
        bl = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, quantizer=quantizer,
                 eps=eps, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            bl.weight.copy_(linear.weight)
            if linear.bias is not None:
                bl.bias.copy_(linear.bias)
        return bl


# One weight quantization per optimizer step. Within a step (all its micro-batches) the latent
# weights do not change, so Q_w(W) is computed once and reused: later micro-batches read the
# layer's step_weight (the STE costs nothing) instead of redoing the absmean-round-clip over W.
@contextlib.contextmanager
def weight_quant_once(model, enabled=True):
    """Around one optimizer step's forward/backward passes (never across an optimizer.step()): each
    BitLinear of `model` quantizes its weight on the first micro-batch and reuses it. Results are
    bit-identical to quantizing every time. enabled=False (FSDP: the gathered weights are transient)
    does nothing."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)] if enabled else []
    for m in layers:
        m.once_per_step, m.step_weight = True, None
    try:
        yield
    finally:
        for m in layers:
            m.once_per_step, m.step_weight = False, None


def bitlinear_int_reference(x, w, quantizer="absmean", eps="add"):
    """The integer computation packed inference performs, in PyTorch (the reference the C kernel
    must match): int8 activations times ternary codes accumulated in int32, then one float scale
    per output: y = acc · (γ/127) · Δ.  x: (..., K) float, w: (N, K) float -> (..., N) float32."""
    check_per_row(quantizer)
    q, gamma = activation_quant_int(x, eps)                 # (..., K) int8, (..., 1)
    codes, delta = weight_quant_int(w, quantizer, eps)      # (N, K) int8, () or (N, 1)
    acc = q.to(torch.int32) @ codes.to(torch.int32).t()     # (..., N) int32, exact
    return acc.float() * (gamma / 127.0) * delta.reshape(-1)
