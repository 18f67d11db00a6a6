"""
CPU inference benchmark on Qwen3-0.6B's geometry and SmolLM2-135M's (the real model of gguf_model.py):
PyTorch fp32 and bf16 against the packed 1.58-bit model (ternary_cpu.c, decode_cpu.c). Random
weights: speed and memory depend on the shapes only (Qwen3-0.6B: hidden 1024, intermediate 3072, 28
layers, 16 q / 8 kv heads, head_dim 128, vocab 151936, tied; SmolLM2-135M: 576, 1536, 30 layers,
9 q / 3 kv heads, head_dim 64, vocab 49152, tied, no q/k-norm).

    python bench.py                 # everything: ~10 minutes on 2 cores; out/bench.json + out/bench.png
    python bench.py --quick         # fewer repeats and tokens, a smoke run
    python bench.py --json results/bench.json --plot results/bench.png   # the README's published figures
    python bench.py --model smollm2   # one geometry (a name below, a .gguf, an HF folder: its config only)
    python bench.py --model out/.../bitdistill/ckpt.pt   # a 1.58-bit checkpoint: its own weights packed

A 1.58-bit checkpoint (a stage-2/3 .pt) is measured with its own weights: the ternary backends pack
it (PackedQwen3.from_bitnet, its SubLN layout included), the torch backends are the full-precision
model of its geometry (no SubLN), the model it was distilled from.

Backends: torch-fp32 / torch-bf16 = model.py's Qwen3 in that dtype; ternary = packed.PackedQwen3
(2-bit linears in C) with the embedding table / tied lm_head in bf16; ternary-int8-head = the same
with that table in int8, like llama.cpp's Q8_0 output. Both decode a token in one C call
(decode_cpu.c), timed also at 1 thread and split into linears / lm_head / everything else;
ternary-int8-head-pydecode runs the same model's PyTorch forward op by op, for comparison.
Each backend runs in its own subprocess, so its peak RSS is its own. Timings: warm-up first, then
repeats; medians with the 10-90% spread. Decode: 128 new tokens timed one by one (tok/s = 1 /
median). Read bandwidth: summing a 1 GiB buffer (and a 128 MiB one that may sit in L3) at 1 and 2
threads; a decode token's floor = (weights + KV cache read) / that bandwidth. Each kernel's GMAC/s
is also given against the ISA's int8 peak, measured by ternary_cpu.c's tl_peak_gmacs.
Run it on a quiet machine: other processes distort every number. The CPU peer (llama.cpp's TQ2_0,
same geometry) is measured beside this script by ../shared/peer/run.sh.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from figures import load_results, plot_bench, print_report  # noqa: E402
from model import Qwen3, Qwen3Config  # noqa: E402
from profiling import peak_memory_bytes  # noqa: E402  (VmHWM: this process's own peak)
from harness import cpu_name, provenance, write_json  # noqa: E402
from model import read_checkpoint  # noqa: E402

BACKENDS = ("torch-fp32", "torch-bf16", "ternary", "ternary-int8-head", "ternary-int8-head-pydecode")


def qwen3_06b():
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


MODELS = ("qwen3-0.6b", "smollm2")   # the default geometries, in this order


def geometry(name):
    """The full-precision config whose shapes are benchmarked: Qwen3-0.6B's, or any model path's own
    (smollm2, a .gguf file, an HF folder or hub id, a .pt checkpoint: the SubLN/BitLinear flags off)."""
    if name == "qwen3-0.6b":
        return qwen3_06b()
    c = read_checkpoint(name).config
    c.bitnet = c.subln = c.subln_all = False
    return c


def stats(ts):
    """Median and 10%/90% of a list of seconds."""
    s = sorted(ts)
    pick = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    return dict(median=pick(0.5), p10=pick(0.1), p90=pick(0.9), n=len(s))


def timeit(fn, warmup, repeat):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return stats(ts)


def read_bandwidth(nbytes, repeat=7):
    """GB/s of summing an fp32 buffer (a pure streaming read) with all torch threads."""
    buf = torch.ones(nbytes // 4)
    st = timeit(lambda: buf.sum(), 2, repeat)
    return nbytes / st["median"] / 1e9


# ---------------------------------------------------------------------------------------------
# Models with random weights

def random_packed(config, head):
    """A PackedQwen3 of `config` filled with random ternary codes (no float model needed, so the
    process's peak RSS is the packed model's)."""
    import ckernels
    import packed as P
    config.bitnet, config.subln = True, True
    pm = P.PackedQwen3(config, head)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, P.PackedLinear):
                N, K = m.out_features, m.in_features
                for i in range(0, N, 1024):  # in slices, to keep the int8 codes small
                    codes = torch.randint(-1, 2, (min(1024, N - i), K), dtype=torch.int8, generator=g)
                    m.packed[i:i + 1024] = ckernels.pack_ternary(codes)
                m.scale.fill_(0.02)
        if head == "int8":  # filled in place: no fp32 table in the peak RSS
            e = pm.embed
            for i in range(0, config.vocab_size, 8192):  # in slices: no full-size temporary
                n = min(8192, config.vocab_size - i)
                e.w8[i:i + n, :config.hidden_size] = torch.randint(-127, 128, (n, config.hidden_size),
                                                                   dtype=torch.int8, generator=g)
                e.wsum[i:i + n] = e.w8[i:i + n].sum(dim=1, dtype=torch.int32)
            e.scale.fill_(0.02 / 127)
        else:
            pm.embed_weight.normal_(0.0, 0.02, generator=g)
    return pm


def trained_packed(path, head):
    """The packed model of a 1.58-bit checkpoint's own weights (its float copy is freed after packing;
    the peak RSS then includes it, the weight bytes do not)."""
    import packed as P
    from model import load_model
    return P.PackedQwen3.from_bitnet(load_model(path).eval(), head)


def is_ternary_checkpoint(name):
    return name.endswith(".pt") and read_checkpoint(name).config.bitnet


def random_torch(config, dtype):
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy in the peak RSS
    try:
        model = Qwen3(config).eval()
    finally:
        torch.set_default_dtype(old)
    return model


def linear_weight_bytes_torch(model):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.endswith("proj.weight"))


# ---------------------------------------------------------------------------------------------
# One backend, in its own process

def decode_tokens(fwd, cache, logits, n, warmup, timing=None):
    """Greedy decode of warmup + n tokens, each timed alone: stats of the n, and with timing (a
    function giving the C step's seconds in linears, head, whole call) the median split of a token."""
    ts, split = [], []
    for i in range(warmup + n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)                              # (1, 1)
        t1 = time.perf_counter()
        logits = fwd(nxt, cache, True)
        if i >= warmup:
            ts.append(time.perf_counter() - t1)
            if timing is not None:
                t = timing()
                split.append((t[0], t[1], t[2]))
    st = stats(ts)
    out = dict(tok_s=1 / st["median"], tok_s_p10=1 / st["p90"], tok_s_p90=1 / st["p10"], tok_s_mean=len(ts) / sum(ts), **st)
    if split:
        med = lambda j: sorted(r[j] for r in split)[len(split) // 2]
        out["split_ms"] = dict(linears=med(0) * 1e3, head=med(1) * 1e3, rest=(med(2) - med(0) - med(1)) * 1e3)
    return out


@torch.no_grad()
def run_backend(name, model_name, config, prompt_lens, new_tokens, repeat):
    baseline = peak_memory_bytes(torch.device("cpu"))   # the interpreter, torch and this script, before any model exists
    t0 = time.perf_counter()
    pm = None
    if name.startswith("torch"):
        model = random_torch(config, torch.float32 if name == "torch-fp32" else torch.bfloat16)
        new_cache = lambda n: model.new_cache(1, n)
        fwd = lambda idx, cache, last: model(idx, cache=cache, last_only=last)
        lin = linear_weight_bytes_torch(model)
        total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
        head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    else:
        head = "bf16" if name == "ternary" else "int8"
        pm = trained_packed(model_name, head) if is_ternary_checkpoint(model_name) else random_packed(config, head)
        pm.c_decode = not name.endswith("pydecode")   # the one-call C step, or PyTorch op by op
        new_cache = lambda n: pm.new_cache(1, n)
        fwd = lambda idx, cache, last: pm(idx, cache, last_only=last)
        mem = pm.memory()
        lin, total, head_bytes = mem["linears"], mem["total"], mem["embed_and_head"]
    build_s, log = time.perf_counter() - t0, lambda msg: print(f"  [{name}] {msg}", file=sys.stderr, flush=True)
    log(f"model built in {build_s:.1f} s")
    res = dict(backend=name, model=model_name, n_linears=7 * config.num_hidden_layers, threads=torch.get_num_threads(), build_s=build_s, prefill={}, weight_bytes=dict(
        linears=lin, total=total, head=head_bytes, per_token=lin + head_bytes), baseline_rss=baseline)
    g = torch.Generator().manual_seed(0)
    for T in prompt_lens:
        idx = torch.randint(0, config.vocab_size, (1, T), generator=g)
        st = timeit(lambda: fwd(idx, new_cache(T), True), 1, repeat)
        res["prefill"][T] = dict(tok_s=T / st["median"], tok_s_p10=T / st["p90"], tok_s_p90=T / st["p10"], **st)
        log(f"prefill {T}: {res['prefill'][T]['tok_s']:.1f} tok/s")
    # decode: a 16-token prompt, 8 warm-up tokens, then new_tokens timed one by one; the C step
    # also at 1 thread (and 2), with its split of a token
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=g)
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * new_cache(1).k[0].element_size()
    res["kv_bytes_per_token"] = kv * (16 + 8 + (new_tokens - 1) / 2)   # cache read at the mean position
    main_threads, res["decode_by_threads"] = torch.get_num_threads(), {}
    for th in ([main_threads] if pm is None or not pm.c_decode else sorted({1, min(2, main_threads), main_threads})):
        torch.set_num_threads(th)
        cache = new_cache(16 + 8 + new_tokens)
        timing = (lambda: pm._step.timing) if pm is not None and pm.c_decode else None
        res["decode_by_threads"][th] = decode_tokens(fwd, cache, fwd(prompt, cache, True), new_tokens, 8, timing)
    res["decode"], res["peak_rss"] = res["decode_by_threads"][main_threads], peak_memory_bytes(torch.device("cpu"))
    res["bandwidth_after_decode"] = {}   # this host's bandwidth drifts by minutes: measured right here
    for th in res["decode_by_threads"]:
        torch.set_num_threads(th)
        res["bandwidth_after_decode"][th] = read_bandwidth(512 << 20)
    torch.set_num_threads(main_threads)
    return res


# ---------------------------------------------------------------------------------------------
# Per-kernel table: each projection shape of one layer, and the lm_head

@torch.no_grad()
def kernel_table(repeat, quick, bandwidth, model_name, c):
    """Each projection shape of one layer and the lm_head, on the best SIMD path at every thread
    count of `bandwidth` ({threads: GB/s}); plain C and PyTorch beside it at the last count."""
    import ckernels as K_
    from packed import Int8Linear
    H, I, qd, kvd = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [("qkv (fused)", H, qd + 2 * kvd), ("o_proj", qd, H), ("gate_up (fused)", H, 2 * I),
              ("down_proj", I, H), ("lm_head int8", H, c.vocab_size), ("lm_head bf16", H, c.vocab_size)]
    L = K_.lib()[0]
    best, counts = L.tl_cpu_path(), sorted(bandwidth)
    peak = {th: L.tl_peak_gmacs(best, th, 20_000_000) for th in counts}   # the ISA's int8 peak, measured
    rows = []
    for name, K, N in tqdm(shapes, desc="kernels", unit="shape"):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(N, K, generator=g) * 0.02
        Wb = W.bfloat16()
        head = name.startswith("lm_head")
        if name == "lm_head int8":
            lin = Int8Linear.from_weight(W)
            wbytes = lin.w8.numel()
            run = lambda x, path, th=0: K_.int8_linear(x, lin.w8, lin.wsum, lin.scale, K, path, th)
        elif name == "lm_head bf16":
            wbytes = Wb.numel() * 2
            run = lambda x, path, th=0: K_.bf16_linear(x, Wb, path, th)
        else:
            packed = K_.pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g))
            scale = torch.full((N,), 0.02)
            wbytes = packed.numel()
            run = lambda x, path, th=0: K_.ternary_linear(x, packed, scale, K, path, th)
        for M in ((1,) if head else (1, 128)):
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            rep_slow = 2 if quick or (M > 1 or head) else 5
            t_c = timeit(lambda: run(x, 0), 1, rep_slow)
            t_fp32 = timeit(lambda: F.linear(x, W), 1, rep_slow * 2)
            t_bf16 = timeit(lambda: F.linear(xb, Wb), 1, rep_slow * 2)
            for th in counts:
                t = timeit(lambda: run(x, best, th), 2, repeat * 4)
                med, gmac = t["median"], M * N * K / t["median"] / 1e9
                rows.append(dict(kernel=name, model=model_name, K=K, N=N, M=M, threads=th, us=med * 1e6, us_p10=t["p10"] * 1e6,
                                 us_p90=t["p90"] * 1e6, gmac_s=gmac, weight_gb_s=wbytes / med / 1e9,
                                 x_isa_peak=None if name == "lm_head bf16" or not peak[th] else gmac / peak[th],
                                 x_bandwidth=wbytes / med / 1e9 / bandwidth[th],
                                 vs_torch_fp32=t_fp32["median"] / med, vs_torch_bf16=t_bf16["median"] / med,
                                 vs_plain_c=t_c["median"] / med, plain_c_us=t_c["median"] * 1e6))
    return rows, {str(th): p for th, p in peak.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=",".join(MODELS),
                    help="comma-separated geometries: qwen3-0.6b, smollm2, a .gguf or an HF folder (its config only), "
                         "a 1.58-bit .pt checkpoint (its weights packed)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for PyTorch and the C kernels")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, from {', '.join(BACKENDS)}")
    ap.add_argument("--prompt_lens", default="128,512", help="comma-separated prompt lengths timed for prefill")
    ap.add_argument("--new_tokens", type=int, default=128, help="decode tokens timed one by one")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats of each prefill (after one warm-up)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: repeat 2, 32 new tokens")
    ap.add_argument("--no_kernels", action="store_true", help="skip the per-kernel table")
    ap.add_argument("--json", default=os.path.join("out", "bench.json"),
                    help="where the results go (results/bench.json is the README's: write there only on purpose)")
    ap.add_argument("--plot", default=os.path.join("out", "bench.png"), help="where the figure goes")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="only print the tables of an earlier run's JSON (the README's: results/bench.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    ap.add_argument("--config", help=argparse.SUPPRESS)  # internal: the worker's geometry, as JSON
    args = ap.parse_args()
    if args.report:
        return print_report(load_results(args.report))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeat, args.new_tokens = 2, 32
    lens = [int(t) for t in args.prompt_lens.split(",")]
    if args.worker:
        config = Qwen3Config.from_dict(json.loads(args.config))  # read by the parent: no file reader in this RSS
        print("RESULT " + json.dumps(run_backend(args.worker, args.model, config, lens, args.new_tokens, args.repeat)))
        return
    started = time.time()
    models = [m for m in args.model.split(",") if m]
    configs = {m: geometry(m) for m in models}        # a missing or foreign model: one line, before any work
    for out in (args.json, args.plot):                # the output folders exist before ten minutes of work
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    import build_ffi
    import ckernels
    simd = build_ffi.describe(ckernels.lib()[0])
    print(f"bench.py: {simd}; torch {torch.__version__}, {args.threads} threads")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"WARNING: load average {load:.1f}: other processes are running, every number below is "
              "noisy (a 2-thread C call waits for a scheduler slice whenever a core is taken)")
    R = dict(cpu=cpu_name(), cpu_flags=ckernels.cpu_flags(), threads=args.threads, simd=simd, torch=torch.__version__,
             load_average_at_start=load,
             prompt_lens=lens, new_tokens=args.new_tokens, repeat=args.repeat, backends=[],
             bandwidth_gb_s=dict(l3_128MiB=read_bandwidth(128 << 20, 15), dram_1GiB_by_threads={}))
    for th in sorted({1, min(2, args.threads), args.threads}):   # the C step's decode runs at these
        torch.set_num_threads(th)
        R["bandwidth_gb_s"]["dram_1GiB_by_threads"][str(th)] = read_bandwidth(1 << 30)
    torch.set_num_threads(args.threads)
    R["bandwidth_gb_s"]["dram_1GiB"] = R["bandwidth_gb_s"]["dram_1GiB_by_threads"][str(args.threads)]
    print("read bandwidth (1 GiB): " + ", ".join(f"{v:.1f} GB/s at {th} thread{'s' * (th != '1')}" for th, v in
                                                 R["bandwidth_gb_s"]["dram_1GiB_by_threads"].items()))
    names = [b for b in args.backends.split(",") if b]
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    runs = [(m, name) for m in models for name in names]
    t_all = time.perf_counter()
    for i, (model, name) in enumerate(runs):
        done = time.perf_counter() - t_all
        eta = f", about {done / i * (len(runs) - i) / 60:.0f} min left for the backends" if i else ""
        print(f"[{i + 1}/{len(runs)}] {model} {name}: build, prefill {args.prompt_lens}, decode {args.new_tokens} "
              f"tokens{eta}", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", model, "--config",
               json.dumps(configs[model].to_dict()), "--threads",
               str(args.threads), "--prompt_lens", args.prompt_lens, "--new_tokens", str(args.new_tokens),
               "--repeat", str(args.repeat)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the worker's progress: stderr
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"bench.py: error: backend {name} on {model} failed (exit {out.returncode}):\n{out.stdout[-2000:]}")
        res = json.loads(lines[-1][7:])
        res["prefill"] = {int(k): v for k, v in res["prefill"].items()}
        res["decode_by_threads"] = {int(k): v for k, v in res["decode_by_threads"].items()}
        R["backends"].append(res)
        print(f"{model} {name}: prefill " + ", ".join(f"{T}: {res['prefill'][T]['tok_s']:.1f}" for T in lens) +
              f" tok/s, decode {res['decode']['tok_s']:.1f} tok/s ({time.perf_counter() - t0:.0f} s)")
    if not args.no_kernels:
        print("per-kernel table: 6 shapes x (best SIMD, plain C, torch fp32, torch bf16) per geometry ...", flush=True)
        bws = {int(th): v for th, v in R["bandwidth_gb_s"]["dram_1GiB_by_threads"].items()}
        R["kernels"] = []
        for m in models:
            rows, R["isa_peak_gmac_s"] = kernel_table(args.repeat, args.quick, bws, m, configs[m])
            R["kernels"] += rows
    print_report(R)
    R["provenance"] = provenance(started)
    write_json(args.json, R)
    print(f"wrote {args.json}")
    plot_bench(R, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    from harness import run_cli
    run_cli(main)
