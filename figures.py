"""
Every figure the project draws, in one place (matplotlib, written to PNG files):

    plot_loss_curves   Figure 3a: stage-2 loss with and without SubLN     (continue_train.py --plot)
    plot_weights       Figure 2: latent weights / Δ before and after stage 2 (continue_train.py --plot_weights)
    plot_toy           the toy's accuracy per method beside its Figure 3a  (toy.py)
    plot_toy_summary   Table 1 per task and recipe, and Figure 3b           (toy.py --compare ... --figure)
    plot_bench         tokens/s of each backend                            (bench.py)
and the tables of a benchmark run, printed as Markdown:
    print_report       bench.py's tables per geometry and its goals         (bench.py, bench.py --report)

Each reads plain data (metrics.json and bench.json files, lists of dicts); none trains or measures anything.
"""
import json

import numpy as np
import torch


def new_figure(ncols=1, size=(7, 4.5)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig, out_png, dpi=120):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)


def label_axes(ax, xlabel, ylabel, title):
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()


# ----------------------------------------------------------------------------- stage 2

def draw_loss_curves(ax, metric_files, labels=None, val=True):
    """Training loss (thin) and validation loss (dots) against steps, one colour per run."""
    for i, path in enumerate(metric_files):
        with open(path) as f:
            m = json.load(f)
        label = labels[i] if labels else m["label"]
        ax.plot([r["step"] for r in m["train"]], [r["loss"] for r in m["train"]], color=f"C{i}", lw=1,
                alpha=0.8, label=f"{label} (train)")
        if val:
            ax.plot([r["step"] for r in m["val"]], [r["loss"] for r in m["val"]], "o--", color=f"C{i}", ms=4,
                    label=f"{label} (val)")


def plot_loss_curves(metric_files, out_png, title="Continued pre-training (paper Figure 3a)"):
    """Figure 3a overlays a stage-2 run with SubLN and one without (metrics.json of each)."""
    fig, ax = new_figure()
    draw_loss_curves(ax, metric_files)
    label_axes(ax, "step", "next-token loss, Eq. (7)", title)
    save_figure(fig, out_png)


def latent_weights_over_delta(model):
    """All latent linear weights of the blocks, each divided by its Δ = mean|W| (Eq. 1-2): values
    in (-0.5, 0.5) quantize to 0, beyond to ±1. Figure 2 plots this distribution."""
    ws = [m.weight.detach().float() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return torch.cat([(w / w.abs().mean().clamp(min=1e-5)).flatten().cpu() for w in ws]).numpy()


def plot_weights(before, after, out_png):
    """Figure 2: the histogram of latent_weights_over_delta before and after continued training."""
    fig, ax = new_figure()
    for w, when in ((before, "before"), (after, "after")):
        ax.hist(w, bins=np.linspace(-4, 4, 161), density=True, alpha=0.5, label=f"{when} continued training")
    for b in (-0.5, 0.5):
        ax.axvline(b, color="k", lw=0.8, ls=":")
    label_axes(ax, "latent weight / Δ   (dotted: rounding boundaries between -1, 0, +1)",
               "density", "Weight distribution (paper Figure 2)")
    save_figure(fig, out_png)


# ----------------------------------------------------------------------------- the toy and the benchmark

def plot_toy(rows, stage2_runs, out_png, val=False):
    """Left: accuracy per method, bars from 0 with their value, ± std over seeds, one dot per seed.
    Right: Figure 3a from the stage-2 runs, stage2_runs = [(metrics.json, label), ...]; val: with
    their held-out loss (dots)."""
    fig, (a, b) = new_figure(2, (13, 4.5))
    y = range(len(rows))
    a.barh(y, [r["mean"] for r in rows], xerr=[r["std"] or 0 for r in rows], color="tab:blue", alpha=0.6)
    for i, r in enumerate(rows):
        a.plot(r["accs"], [i] * len(r["accs"]), "k.", ms=4)
        a.text(1, i, f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else ""), va="center",
               color="white", fontsize=8)
    a.set_yticks(list(y), [r["row"] for r in rows])
    a.set(xlim=(0, 100), xlabel=f"validation accuracy (%, axis from 0), {rows[0]['n_seeds']} seed(s); dots: single seeds")
    a.invert_yaxis()
    draw_loss_curves(b, [p for p, _ in stage2_runs], [label for _, label in stage2_runs], val=val)
    label_axes(b, "stage-2 step", "next-token loss (nats)", "stage 2 of the 1.58-bit student"
               + (",\nwith and without SubLN (Figure 3a's comparison)" if any("without" in l for _, l in stage2_runs)
                  else ",\nagainst the full-precision model" if len(stage2_runs) > 1 else ""))
    save_figure(fig, out_png, dpi=110)


def plot_toy_summary(results, out_png):
    """One panel per task: Table 1's three rows, one bar per recipe (mean from 0, ± std, a dot per
    seed); a last panel: accuracy against the L_AD layer (Figure 3b) from the runs that swept it.
    results: toy.py results.json objects."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    sweeps = [r for r in results if any(x["tables"] == "3b" for x in r["rows"])]
    fig, axes = new_figure(len(tasks) + bool(sweeps), (5.5 * (len(tasks) + bool(sweeps)), 4.5))
    axes = np.atleast_1d(axes)
    methods = ("FP16-SFT", "BitNet-SFT", "BitDistill")
    for ax, task in zip(axes, tasks):
        mine = [r for r in results if r["task"] == task]
        width = 0.8 / len(mine)
        for j, r in enumerate(mine):
            rows = [next(x for x in r["rows"] if x["row"] == m) for m in methods]
            xs = np.arange(len(methods)) + (j - (len(mine) - 1) / 2) * width
            ax.bar(xs, [x["mean"] for x in rows], width, yerr=[x["std"] or 0 for x in rows], alpha=0.6,
                   color=f"C{j}", label=f"--recipe {r['recipe']} ({len(r['seeds'])} seeds)")
            for x0, x in zip(xs, rows):
                ax.plot([x0] * len(x["accs"]), x["accs"], "k.", ms=4)
                ax.text(x0, 2, f"{x['mean']:.1f}", ha="center", fontsize=8)
        ax.set_xticks(range(len(methods)), methods)
        label_axes(ax, "", "validation accuracy (%, axis from 0)", f"{task.upper()}, {mine[0].get('labels')} labels")
        ax.set_ylim(0, 100)
    if sweeps:
        ax = axes[-1]
        for j, r in enumerate(sweeps):
            pts = sorted((x["distill_layer"], x) for x in r["rows"] if x.get("distill_layer") is not None
                         and (x["tables"] == "3b" or x["row"] == "BitDistill"))
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] or 0 for p in pts],
                        marker="o", capsize=3, color=f"C{j}", label=f"{r['task'].upper()}, --recipe {r['recipe']}")
            for layer, x in pts:
                ax.plot([layer] * len(x["accs"]), x["accs"], "k.", ms=4)
            names = [x["row"] for x in r["rows"]]
            base = "BitNet-SFT + SubLN + CT" if "BitNet-SFT + SubLN + CT" in names else "BitNet-SFT"
            ax.axhline(next(x for x in r["rows"] if x["row"] == base)["mean"], color=f"C{j}", ls=":",
                       label=f"{base} (the same without a teacher)" if "CT" in base else base)
            ax.set_xticks([p[0] for p in pts])
        label_axes(ax, "student layer distilled by L_AD (0 = first)", "validation accuracy (%)",
                   "Figure 3b at toy scale: the L_AD layer")
    save_figure(fig, out_png, dpi=110)


def plot_bench(R, out_png):
    """One panel per measurement (prefill at each prompt length, decode), one bar per backend."""
    models = {b.get("model", "qwen3-0.6b") for b in R["backends"]}
    names = [b["backend"] if len(models) == 1 else f'{b.get("model", "qwen3-0.6b")} {b["backend"]}' for b in R["backends"]]
    metrics = [f"prefill {T}" for T in R["prompt_lens"]] + ["decode"]
    vals = [[b["prefill"][T]["tok_s"] for T in R["prompt_lens"]] + [b["decode"]["tok_s"]] for b in R["backends"]]
    fig, axes = new_figure(len(metrics), (4 * len(metrics), 4))
    for j, (ax, m) in enumerate(zip(np.atleast_1d(axes), metrics)):
        ax.bar(range(len(names)), [v[j] for v in vals], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{m} (tok/s)")
    weights = "a checkpoint's ternary weights" if any(m.endswith(".pt") for m in models) else "random weights"
    fig.suptitle(f"{', '.join(sorted(models))} geometry, {weights}, {R['threads']} threads, {R['cpu']}", fontsize=9)
    save_figure(fig, out_png, dpi=110)


# ----------------------------------------------------------------------------- bench.py's tables

def load_results(path):
    """A bench.json as print_report wants it (JSON keys are strings: prompt lengths back to ints)."""
    with open(path) as f:
        R = json.load(f)
    for b in R["backends"]:
        b["prefill"] = {int(k): v for k, v in b["prefill"].items()}
        b["decode_by_threads"] = {int(k): v for k, v in b["decode_by_threads"].items()}
    return R


def fmt_mb(b):
    return f"{b / 1e6:8.1f} MB"


def model_of(x):
    return x.get("model", "qwen3-0.6b")   # results written before the second geometry: Qwen3-0.6B


def print_report(R):
    bws = R["bandwidth_gb_s"]
    print(f"\nCPU: {R['cpu']} | flags: {' '.join(R['cpu_flags'])} | threads: {R['threads']} | "
          f"kernels: {R['simd']}")
    print("measured read bandwidth: " + ", ".join(f"{v:.1f} GB/s at {th} thread{'s' * (th != '1')}"
                                                  for th, v in bws["dram_1GiB_by_threads"].items()) +
          f" (1 GiB buffer); {bws['l3_128MiB']:.1f} GB/s (128 MiB buffer)")
    for model in dict.fromkeys(model_of(b) for b in R["backends"]):
        print(f"\n## {model} " + ("(its ternary weights packed; torch: the full-precision geometry, random weights)"
                                   if model.endswith(".pt") else "geometry (random weights)"))
        print_model_report(R, model, [b for b in R["backends"] if model_of(b) == model],
                           [k for k in R.get("kernels", []) if model_of(k) == model])
    print_goals(R)


def print_model_report(R, model, backends, kernels):
    bw, lens = R["bandwidth_gb_s"]["dram_1GiB"], R["prompt_lens"]
    print("\n| backend | " + " | ".join(f"prefill {T} tok/s [p10-p90]" for T in lens) +
          " | decode tok/s [p10-p90] | weight MB read/token | decode GB/s (x of measured) | "
          "linear weights | whole model | peak RSS |")
    print("|" + "---|" * (7 + len(lens)))
    for b in backends:
        wb = b["weight_bytes"]
        d = b["decode"]
        gbs = wb["per_token"] * d["tok_s"] / 1e9
        pre = " | ".join(f"{b['prefill'][T]['tok_s']:7.1f} [{b['prefill'][T]['tok_s_p10']:.0f}-"
                         f"{b['prefill'][T]['tok_s_p90']:.0f}]" for T in lens)
        print(f"| {b['backend']:17s} | {pre} | {d['tok_s']:6.1f} [{d['tok_s_p10']:.1f}-{d['tok_s_p90']:.1f}] | "
              f"{wb['per_token'] / 1e6:7.1f} | {gbs:5.1f} ({gbs / bw:.2f}x) | {fmt_mb(wb['linears'])} | "
              f"{fmt_mb(wb['total'])} | {fmt_mb(b['peak_rss'])} |")
    n_lin = backends[0].get("n_linears", 196)           # 196: Qwen3-0.6B, before the field existed
    print(f"linear weights = the {n_lin} q/k/v/o/gate/up/down matrices (ternary: 2-bit codes + fp32 scales); whole "
          "model = every tensor held (tied embedding once); weight MB read/token = linear weights + lm_head.")
    print_decode_split(backends)
    if kernels:
        main_th = R["threads"]
        print("\nper-kernel (best SIMD path; x of ISA peak = GMAC/s over the path's int8 peak measured here: "
              + ", ".join(f"{v:.0f} GMAC/s at {th} thr." for th, v in R["isa_peak_gmac_s"].items()) +
              f"; speed-ups, their time / ours, at {main_th} threads)")
        print("| kernel | K x N | tokens | threads | µs [p10-p90] | GMAC/s (x of ISA peak) | weight GB/s (x of bandwidth) "
              "| vs torch fp32 | vs torch bf16 | vs our plain C |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k in kernels:
            vs = (f"{k['vs_torch_fp32']:.2f}x | {k['vs_torch_bf16']:.2f}x | {k['vs_plain_c']:.2f}x"
                  if k["threads"] == main_th else "– | – | –")
            peak = f" ({k['x_isa_peak']:.2f}x)" if k["x_isa_peak"] is not None else ""
            print(f"| {k['kernel']} | {k['K']}x{k['N']} | {k['M']} | {k['threads']} | {k['us']:.1f} [{k['us_p10']:.1f}-"
                  f"{k['us_p90']:.1f}] | {k['gmac_s']:.1f}{peak} | {k['weight_gb_s']:.1f} ({k['x_bandwidth']:.2f}x) | {vs} |")


def print_decode_split(backends):
    """One decode token of the C step, split, at each thread count, against its bandwidth floor."""
    rows = [(b, th, d) for b in backends for th, d in b["decode_by_threads"].items() if "split_ms" in d]
    if not rows:
        return
    print("\ndecode, one token of the C step (medians; floor = the bytes a token must read, the weights plus the "
          "fp16 KV cache at the mean position, over the read bandwidth measured by the same process right after)")
    print("| backend | threads | tok/s | ms/token | linears ms | lm_head ms | everything else ms | MB read/token "
          "(weights + KV) | floor tok/s | x of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, th, d in rows:
        sp, nbytes = d["split_ms"], b["weight_bytes"]["per_token"] + b["kv_bytes_per_token"]
        floor = b["bandwidth_after_decode"][str(th)] * 1e9 / nbytes
        print(f"| {b['backend']} | {th} | {d['tok_s']:.1f} | {1e3 / d['tok_s']:.2f} | {sp['linears']:.2f} | "
              f"{sp['head']:.2f} | {sp['rest']:.2f} | {b['weight_bytes']['per_token'] / 1e6:.1f} + "
              f"{b['kv_bytes_per_token'] / 1e6:.1f} | {floor:.1f} | {d['tok_s'] / floor:.2f}x |")


def print_goals(R):
    """The goals this run can judge, on Qwen3-0.6B's geometry: reported, never asserted."""
    B = {b["backend"]: b for b in R["backends"] if model_of(b) == "qwen3-0.6b"}
    out = []
    int8 = B.get("ternary-int8-head")
    if int8 and "split_ms" in int8["decode"]:
        nbytes = int8["weight_bytes"]["per_token"] + int8["kv_bytes_per_token"]
        floor = int8["bandwidth_after_decode"][str(R["threads"])] * 1e9 / nbytes
        out.append(("decode (int8 head, C step) >= 80% of its bandwidth floor", int8["decode"]["tok_s"] / floor, 0.8))
        out.append(("... everything outside the matrix kernels <= 3 ms per token (ms)",
                    int8["decode"]["split_ms"]["rest"], 3.0))
    torch_b = [B[n] for n in ("torch-fp32", "torch-bf16") if n in B]
    packed = [b for n, b in B.items() if n.startswith("ternary") and 128 in b["prefill"]]
    if torch_b and packed and 128 in torch_b[0]["prefill"]:
        fastest = max(b["prefill"][128]["tok_s"] for b in torch_b)
        out.append(("prefill 128 >= 2.65x the fastest PyTorch", max(b["prefill"][128]["tok_s"] for b in packed) / fastest, 2.65))
    heads = [k for k in R.get("kernels", []) if k["kernel"] == "lm_head int8" and k["threads"] == R["threads"]
             and model_of(k) == "qwen3-0.6b"]
    if heads:
        out.append(("int8 lm_head GEMV >= 80% of the measured read bandwidth", heads[0]["x_bandwidth"], 0.8))
    if int8 and "torch-bf16" in B:
        grown = lambda b: b["peak_rss"] - b["baseline_rss"]
        out.append(("peak memory of the packed model (RSS growth over the bare process) <= 1/4 of bf16's",
                    grown(int8) / grown(B["torch-bf16"]), 0.25))
    print("\ngoals (Qwen3-0.6B geometry; reported, not asserted)" * bool(out))
    for text, value, target in out:
        met = value <= target if "<=" in text else value >= target
        print(f"  [{'met' if met else 'NOT met'}] {text}: {value:.2f} (target {target})")
