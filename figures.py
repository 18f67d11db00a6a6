"""
Every figure the project draws, in one place (matplotlib, written to PNG files):

    plot_loss_curves   Figure 3a: stage-2 loss with and without SubLN     (continue_train.py --plot)
    plot_weights       Figure 2: latent weights / Δ before and after stage 2 (continue_train.py --plot_weights)
    plot_toy           the toy's accuracy per method beside its Figure 3a  (toy.py)
    plot_toy_summary   Table 1 per task and recipe, and Figure 3b           (toy.py --compare ... --figure)
    plot_bench         tokens/s of each backend                            (bench.py)

Each reads plain data (metrics.json files, lists of dicts); none trains or measures anything.
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

def plot_toy(rows, stage2_runs, out_png):
    """Left: accuracy per method, bars from 0 with their value, ± std over seeds, one dot per seed.
    Right: Figure 3a from the toy's stage-2 runs, stage2_runs = [(metrics.json, label), ...]."""
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
    draw_loss_curves(b, [p for p, _ in stage2_runs], [label for _, label in stage2_runs], val=False)
    label_axes(b, "stage-2 step", "training loss", "stage 2 of the 1.58-bit student"
               + (",\nwith and without SubLN (Figure 3a's comparison)" if len(stage2_runs) > 1 else ""))
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
    names = [b["backend"] for b in R["backends"]]
    metrics = [f"prefill {T}" for T in R["prompt_lens"]] + ["decode"]
    vals = [[b["prefill"][T]["tok_s"] for T in R["prompt_lens"]] + [b["decode"]["tok_s"]] for b in R["backends"]]
    fig, axes = new_figure(len(metrics), (4 * len(metrics), 4))
    for j, (ax, m) in enumerate(zip(np.atleast_1d(axes), metrics)):
        ax.bar(range(len(names)), [v[j] for v in vals], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{m} (tok/s)")
    fig.suptitle(f"Qwen3-0.6B geometry, random weights, {R['threads']} threads, {R['cpu']}", fontsize=9)
    save_figure(fig, out_png, dpi=110)
