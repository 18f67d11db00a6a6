"""
Training speed, one command away: `--profile N` in continue_train.py and distill.py runs
one warm-up optimizer step and then N timed ones, and prints tokens/s, the step split into forward
/ backward / optimizer, peak memory and model FLOPs utilisation (MFU). It evaluates nothing and
writes nothing: the output folder is not touched.

    python continue_train.py --init Qwen/Qwen3-0.6B --block_size 2048 --batch_size 4 --profile 10
    python distill.py --task sst2 --method bitdistill --student ... --teacher ... --profile 10

MFU = model FLOPs per second / the device's peak. Model FLOPs per token (PaLM, appendix B): 6 N for
the trained model's forward and backward (N = its parameters in matmuls: every linear and the
lm_head, not the embedding lookup) + 12 L T d_attn for attention's two matmuls (L layers, T
positions, d_attn = heads x head_dim; 6 x 2 L T d_attn with causal masking ignored, as PaLM does),
and 2 N_t + 4 L_t T d_attn,t for a teacher that only runs forward (distill.py). The peak is
MEASURED here, not read off a spec sheet: the best rate of a large matmul in the training dtype
(bf16 on a GPU that has it, else fp32), so MFU reads "fraction of what this device's matmul
reaches". Phases are separated by device synchronisations, which cost a little speed: profile
numbers are for understanding a step, the training log's tok/s for the run itself.

Run as a script, it times one BitLinear at a model's geometry against the nn.Linear it replaces
(forward + backward, eager and torch.compile), and the quantizers alone in units of one copy of
their input (a memory pass): the reference forms of bitlinear.py with the usual x + (q - x).detach()
STE against the fused forms training uses.

    python profiling.py                                   # Qwen3-0.6B's q_proj shape, 8192 tokens
    python profiling.py --device cuda --dtype bfloat16
"""
import argparse
import json
import resource
import sys
import time

import torch

from bitlinear import BitLinear, activation_quant, activation_quant_fused, ste, weight_quant, weight_quant_fused
from harness import HelpFormatter, positive_int, run_cli


def linear_flops_per_token(config):
    """2 N: every linear of every layer (q, k, v, o, gate, up, down) and the lm_head, forward."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return 2 * (c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size)


def attention_flops_per_token(config, T):
    """4 L T d_attn: q k^T and att v of every layer at sequence length T, forward, no causal discount."""
    return 4 * config.num_hidden_layers * T * config.num_attention_heads * config.head_dim


def matmul_flops_per_token(config, T):
    """Forward FLOPs per token of one model at sequence length T."""
    return linear_flops_per_token(config) + attention_flops_per_token(config, T)


def training_flops_per_token(config, T, teacher_config=None):
    """Forward + backward of the trained model (3x its forward) + the teacher's forward."""
    return 3 * matmul_flops_per_token(config, T) + (matmul_flops_per_token(teacher_config, T) if teacher_config else 0)


def measured_peak_flops(device, dtype, seconds=0.5):
    """FLOP/s of the best of repeated n x n matmuls in `dtype` (n = 8192 on a GPU, 1024 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, t_end = float("inf"), time.perf_counter() + seconds
    for i in range(1000):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return 2 * n ** 3 / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device):
    """GPU: the most memory PyTorch held at once; CPU: the process's peak resident set (VmHWM, not
    ru_maxrss: on Linux ru_maxrss carries the parent's high-water mark across fork+exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Profiler:
    """Times the optimizer steps of a run from outside them (steps = 0: every method hands back what it
    was given, no syncs). Before the loop: step_fn = prof.step(step_fn) times whole steps; a function
    the step calls, wrapped as prof.phase("data" | "forward", fn, count), is timed on its own, count(its
    result) -> (tokens, model FLOPs) for the forward; prof.watch(optimizer) times optimizer.step through
    its hooks. "backward" is the rest of a step: backward, clipping, the loss sync. The first step is a
    warm-up and is not counted; prof.finished is True once the report is printed."""

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, steps, device, dtype, label):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype      # "bfloat16" -> torch.bfloat16
        self.steps, self.device, self.dtype, self.label = steps, device, dtype, label
        self.done_steps, self.times, self.tokens, self.flops = -1, dict.fromkeys(self.PHASES, 0.0), 0, 0.0
        self.step_totals = []   # seconds of each counted step: a recompile shows as one slow step
        self.this_step, self.finished = {}, False
        if steps and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def now(self):
        sync(self.device)
        return time.perf_counter()

    def phase(self, name, fn, count=None):
        if not self.steps:
            return fn

        def timed(*a, **k):
            t0 = self.now()
            out = fn(*a, **k)
            self.this_step[name] = self.this_step.get(name, 0.0) + self.now() - t0
            if count:
                tokens, flops = count(out)
                self.this_step["tokens"] = self.this_step.get("tokens", 0) + tokens
                self.this_step["flops"] = self.this_step.get("flops", 0.0) + flops
            return out
        return timed

    def watch(self, optimizer):
        if self.steps:
            t0 = []
            optimizer.register_step_pre_hook(lambda *_: t0.append(self.now()))
            optimizer.register_step_post_hook(
                lambda *_: self.this_step.update(optimizer=self.this_step.get("optimizer", 0.0) + self.now() - t0.pop()))

    def step(self, fn):
        if not self.steps:
            return fn

        def timed(*a, **k):
            self.this_step = {}
            t0 = self.now()
            out = fn(*a, **k)
            total, st = self.now() - t0, self.this_step
            st["backward"] = total - sum(st.get(p, 0.0) for p in ("data", "forward", "optimizer"))   # the rest
            if self.done_steps >= 0:                                                 # step -1 is the warm-up
                for p in self.PHASES:
                    self.times[p] += st.get(p, 0.0)
                self.tokens, self.flops = self.tokens + st.get("tokens", 0), self.flops + st.get("flops", 0.0)
                self.step_totals.append(total)
            self.done_steps += 1
            if self.done_steps == self.steps:
                self.report()
                self.finished = True
            return out
        return timed

    def report(self):
        step_s = sum(self.times.values())
        tok_s, peak = self.tokens / step_s, measured_peak_flops(self.device, self.dtype)
        res = dict(label=self.label, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
                   steps=self.steps, tokens_per_step=self.tokens // self.steps, tok_per_s=tok_s,
                   step_ms={p: 1e3 * t / self.steps for p, t in self.times.items()},
                   median_step_ms=1e3 * sorted(self.step_totals)[len(self.step_totals) // 2],
                   slowest_step_ms=1e3 * max(self.step_totals),
                   peak_memory_gb=peak_memory_bytes(self.device) / 1e9,
                   model_flops_per_token=self.flops / self.tokens, measured_peak_tflops=peak / 1e12,
                   mfu=self.flops / step_s / peak)
        ms = res["step_ms"]
        print(f"profile ({self.label}, {res['device']}, {res['dtype']}, {self.steps} steps after 1 warm-up): "
              f"{tok_s:,.0f} tok/s | step {sum(ms.values()):.1f} ms = data {ms['data']:.1f} + forward "
              f"{ms['forward']:.1f} + backward {ms['backward']:.1f} + optimizer {ms['optimizer']:.1f} (median "
              f"{res['median_step_ms']:.1f}, slowest {res['slowest_step_ms']:.1f}) | peak memory "
              f"{res['peak_memory_gb']:.2f} GB | MFU {res['mfu']:.1%} of the measured {res['dtype']} matmul peak "
              f"{res['measured_peak_tflops']:.3f} TFLOP/s ({res['model_flops_per_token'] / 1e6:.2f} MFLOP per token)")
        print("PROFILE " + json.dumps(res))
        return res


# ----------------------------------------------------------------------------- the quantizers alone

def best_ms(fn, device, reps):
    """Best-of-`reps` wall time of fn() in ms, after two warm-up calls (compilation, caches)."""
    fn(), fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def quantizer_profile(device, dtype, tokens, d_in, d_out, reps=10):
    """{name: ms} for the quantizers and one linear layer, forward + backward where it says so."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype, requires_grad=True)
    old_ste = lambda v, q: v + (q - v).detach()   # noqa: E731  the usual STE, for comparison

    def layer_step(layer):
        def go():
            layer(x).backward(gy)
            layer.zero_grad(set_to_none=True)
            x.grad = None
        return go
    gy = torch.randn(tokens, d_out, device=device, dtype=dtype)
    fp, bit = (cls(d_in, d_out, bias=False, device=device, dtype=dtype) for cls in (torch.nn.Linear, BitLinear))
    fused_act = lambda: ste(x, activation_quant_fused(x))                # noqa: E731
    out = {"copy of X": lambda: x.detach().clone(),
           "Eq. 3 + STE, reference": lambda: old_ste(x, activation_quant(x)),
           "Eq. 3 + STE, fused": fused_act,
           "Eq. 3 + STE, fused, compiled": torch.compile(fused_act),
           "copy of W": lambda: w.detach().clone(),
           "Eq. 1-2 + STE, reference": lambda: old_ste(w, weight_quant(w)),
           "Eq. 1-2 + STE, fused": lambda: ste(w, weight_quant_fused(w)),
           "nn.Linear fwd+bwd": layer_step(fp), "BitLinear fwd+bwd": layer_step(bit),
           "nn.Linear fwd+bwd, compiled": layer_step(torch.compile(fp)),
           "BitLinear fwd+bwd, compiled": layer_step(torch.compile(bit))}
    return {k: best_ms(f, device, reps) for k, f in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="tensor dtype")
    p.add_argument("--tokens", type=positive_int, default=8192, help="rows of X (batch x sequence)")
    p.add_argument("--d_in", type=positive_int, default=1024, help="input width (Qwen3-0.6B hidden size)")
    p.add_argument("--d_out", type=positive_int, default=2048, help="output width (Qwen3-0.6B q_proj)")
    p.add_argument("--reps", type=positive_int, default=10, help="timed calls; the best is kept")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    ms = quantizer_profile(device, getattr(torch, args.dtype), args.tokens, args.d_in, args.d_out, args.reps)
    print(f"# {args.device} {args.dtype}, X {args.tokens} x {args.d_in}, W {args.d_out} x {args.d_in}, best of {args.reps}")
    for k, v in ms.items():
        unit = ms["copy of X"] if "Eq. 3" in k else ms["copy of W"] if "Eq. 1" in k else None
        print(f"{k:32s} {v:9.3f} ms" + (f"   {v / unit:5.2f} copies" if unit else ""))
    for mode in ("", ", compiled"):
        print(f"BitLinear / nn.Linear{mode}: {ms['BitLinear fwd+bwd' + mode] / ms['nn.Linear fwd+bwd' + mode]:.2f}x")
    print("QUANTPROFILE " + json.dumps(dict(vars(args), ms=ms)))


if __name__ == "__main__":
    run_cli(main)
