"""
BitLinear: the 1.58-bit linear layer of BitNet b1.58, as used by BitNet Distillation.

Paper section 2 (Preliminaries), arXiv 2510.13998:
  Eq. (1)-(2)  weights   -> ternary {-1, 0, +1} times one per-tensor scale Δ = mean|W|  (absmean)
  Eq. (3)      activations -> int8 per token, scale γ = max|X| over the hidden dim       (absmax)
  STE          gradients pass straight through both RoundClips.

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


# Eq. (1)-(2), integer form: codes = RoundClip(W / (Δ+ε), -1, 1), Δ = mean(|W|)
def weight_quant_int(w):
    """Returns (codes int8 in {-1,0,1} with w's shape, Δ as a 0-dim float32 tensor)."""
    w = w.float()
    delta = w.abs().mean()
    codes = round_clip(w / (delta + EPS), -1, 1).to(torch.int8)
    return codes, delta


# Eq. (1): Q_w(W) = Δ · RoundClip(W / (Δ+ε), -1, 1)   (de-quantized float), what BitLinear.forward runs.
# The arithmetic is float32 whatever W's dtype (the result comes back in W's dtype), so the codes
# are weight_quant_int's, the ones packed inference uses. FUSED (below) picks the form: the
# reference, one line per symbol, or the same values with fewer passes over memory.
def weight_quant(w):
    if FUSED:
        return weight_quant_fused(w)
    wf = w.float()
    delta = wf.abs().mean()
    return (delta * round_clip(wf / (delta + EPS), -1, 1)).to(w.dtype)


# Eq. (3), integer form: q = RoundClip(127/(γ+ε) · X, -128, 127), γ = max|X| per token
def activation_quant_int(x):
    """Returns (q int8 with x's shape, γ float32 of shape x.shape[:-1] + (1,))."""
    x = x.float()
    gamma = x.abs().amax(dim=-1, keepdim=True)  # (..., 1): one scale per token
    q = round_clip(x * (127.0 / (gamma + EPS)), -128, 127).to(torch.int8)
    return q, gamma


# Eq. (3): Q_INT8(X) = γ/127 · RoundClip(127/(γ+ε) · X, -128, 127)   (de-quantized float)
# Float32 arithmetic as above: under bf16 autocast, bf16 arithmetic would round 127/(γ+ε)·X to a
# multiple of 0.5 above 64 before RoundClip, and train on codes inference never sees.
def activation_quant(x):
    if FUSED:
        return activation_quant_fused(x)
    xf = x.float()
    gamma = xf.abs().amax(dim=-1, keepdim=True)  # (..., 1)
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
def weight_quant_fused(w):
    wf = w.float()                                                      # no copy when W is fp32
    a = wf.abs()                                                        # (N, K), the one new tensor
    delta = a.mean()
    q = torch.div(wf, delta + EPS, out=a)                               # reuses |W|'s memory
    return q.round_().clamp_(-1, 1).mul_(delta).to(w.dtype)


@torch.no_grad()
def activation_quant_fused(x):
    xf = x.float()
    gamma = torch.maximum(xf.amax(dim=-1, keepdim=True), -xf.amin(dim=-1, keepdim=True))  # (..., 1) = max|X|
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
    step_weight: Q_w(W) kept for the rest of one optimizer step inside weight_quant_once(), else None."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_module("in_norm", None)
        self.once_per_step, self.step_weight = False, None

    def forward(self, x):
        if self.in_norm is not None:
            x = self.in_norm(x)
        q = self.step_weight
        if q is None:
            q = weight_quant(self.weight)                # Eq. (1)-(2)
            if self.once_per_step:
                self.step_weight = q
        w = ste(self.weight, q)
        x = ste(x, activation_quant(x))                  # Eq. (3)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_linear(cls, linear):
        """A BitLinear holding the same latent weight (and bias) as `linear`."""
        bl = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                 device=linear.weight.device, dtype=linear.weight.dtype)
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


def bitlinear_int_reference(x, w):
    """The integer computation packed inference performs, in PyTorch (the reference the C kernel
    must match): int8 activations times ternary codes accumulated in int32, then one float scale
    per output: y = acc · (γ/127) · Δ.  x: (..., K) float, w: (N, K) float -> (..., N) float32."""
    q, gamma = activation_quant_int(x)            # (..., K) int8, (..., 1)
    codes, delta = weight_quant_int(w)            # (N, K) int8, ()
    acc = q.to(torch.int32) @ codes.to(torch.int32).t()  # (..., N) int32, exact
    return acc.float() * (gamma / 127.0) * delta
