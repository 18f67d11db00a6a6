"""
The whole BitNet Distillation pipeline at toy scale, on a CPU, offline: the README's quick start.

No Qwen3 weights can be downloaded here, so a tiny Qwen3-architecture teacher is pretrained from
scratch by the project's own loop, and then the paper's pipeline runs on it, on SST-2:

    0. a 4,096-token byte-level BPE vocabulary trained on the corpus (tokenizer.train_bpe)
    1. continue_train.py --from_scratch --quant none          the tiny full-precision "LLM"
    2. continue_train.py --init teacher (SubLN, 1.58-bit)     stage 1 + stage 2
    3. distill.py --method fp16-sft                            FP16-SFT, the teacher     (Table 1)
    4. distill.py --method bitnet-sft --no_subln               BitNet-SFT                (Table 1)
    5. distill.py --method bitdistill                          BitDistill                (Table 1)
    with --ablations, also the rows of Table 5 and 6 and the no-SubLN stage-2 run (Figure 3a).

Every stage is one of the repo's own commands, printed before it runs; a finished stage is not
run again, so an interrupted pipeline continues where it stopped (an unfinished stage starts over).
Each stage shows its progress; its full output goes to the log named before it starts. Results:
<out>/<recipe>/results.json, results.csv and toy.png (accuracy per method; stage-2 loss with and
without SubLN).

    export BITDISTILL_DATA=../shared/data
    python toy.py                                  # the quick start: one seed
    python toy.py --ablations --seeds 1 2 3        # Tables 1, 5, 6 over three seeds
    python toy.py --preset smoke --out out/smoke   # a few steps per stage (the CI test)

Why a small vocabulary: with Qwen's 151,936-row embedding the lm_head alone would cost a model
this small more than all its layers together on a CPU. The vocabulary is trained with the same
byte-level BPE and Qwen's pre-tokenizer regex, and read back through tokenizer.load_tokenizer.
"""
import argparse
import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

from figures import plot_toy
from tokenizer import save_tiktoken, train_bpe
from training import HelpFormatter, provenance, run_cli, write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))


def lm_stage(tokens, block, batch, lr, eval_interval, eval_iters):
    """continue_train.py flags of one language-modelling stage (the teacher's pretraining, stage 2)."""
    return ["--tokens", tokens, "--block_size", block, "--batch_size", batch, "--lr", lr,
            "--eval_interval", eval_interval, "--eval_iters", eval_iters]


# quick: the README's quick start (~17 min on 2 cores); smoke: a few steps per stage (the CI test)
PRESETS = {
    "quick": dict(
        vocab=4096, model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64),
        pretrain=lm_stage("1.5e6", "128", "16", "2e-3", "100", "10"),
        ct=lm_stage("5e5", "128", "16", "1e-3", "50", "10"),
        sft=["--max_steps", "300", "--batch_size", "32", "--micro_batch_size", "32", "--max_len", "128"],
        lr_fp="1e-3", lr_bit="2e-3", eval=[]),
    "smoke": dict(
        vocab=512, model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        pretrain=lm_stage("2048", "32", "8", "1e-3", "4", "1"),
        ct=lm_stage("1024", "32", "8", "1e-3", "2", "1"),
        sft=["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "4", "--max_len", "64"],
        lr_fp="1e-3", lr_bit="1e-3", eval=["--eval_limit", "8"]),
}
CORPUS = ("c4_sample.jsonl", "wikitext2_test.raw", "tinyshakespeare.txt")


def finished(done_file):
    """A stage is done when its marker exists, or its results.json is one run's results (a file a
    crash or a full disk cut short does not count)."""
    if not done_file.endswith(".json"):
        return os.path.exists(done_file)
    try:
        with open(done_file) as f:
            return "metrics" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def run(cmd, done_file, log, title):
    """Runs one stage (a repo command) unless it is finished: its command and log path first, then
    its progress (a bar fed by the stage's step lines), the full output in the log. An unfinished
    stage (interrupted, or never run) starts over: --overwrite replaces what it left."""
    if finished(done_file):
        print(f"[skip] {title}: {done_file} exists")
        return
    cmd = cmd + ["--overwrite"]
    print(f"{title}\n$ python " + " ".join(cmd) + f"\n  log: {log}", flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0, bar = time.time(), None
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-u"] + cmd, cwd=HERE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:   # text mode splits tqdm's \r updates into lines too
            f.write(line)
            m = STEP.match(line) or EVAL.match(line)
            if m:
                phase, done, total = m["phase"] or "train", int(m["done"]), int(m["total"])
                if bar is None or bar.desc != f"  {phase}":
                    bar and bar.close()
                    bar = tqdm(total=total, desc=f"  {phase}", unit="step" if phase == "train" else "batch", leave=False)
                bar.update(done - bar.n)
        p.wait()
    if bar is not None:
        bar.close()
    if p.returncode != 0:
        tail = open(log).read()[-3000:]
        sys.exit(f"stage failed (exit {p.returncode}); last lines of {log}:\n{tail}")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


STEP = re.compile(r"^step (?P<done>\d+)/(?P<total>\d+) \| loss(?P<phase>)")            # a training step
EVAL = re.compile(r"^(?P<phase>eval \w+|validation):\s+\d+%.*?\| (?P<done>\d+)/(?P<total>\d+) ")  # a tqdm bar


def make_tokenizer(data_dir, vocab, out):
    path = os.path.join(out, "tokenizer", "vocab.tiktoken")
    if not os.path.exists(path):
        texts = []
        for name in CORPUS:
            with open(os.path.join(data_dir, "corpus", name), encoding="utf-8") as f:
                texts.append("".join(json.loads(l)["text"] + "\n" for l in f) if name.endswith(".jsonl") else f.read())
        t0 = time.time()
        save_tiktoken(train_bpe("\n".join(texts), vocab - 3), os.path.dirname(path))  # + 3 added tokens
        print(f"trained a {vocab}-token BPE vocabulary in {time.time() - t0:.0f} s -> {path}")
    return path


def sft_runs(ablations):
    """(row name, table(s), distill.py method and flags, which pretrained model it starts from)."""
    rows = [("FP16-SFT", "1", "fp16-sft", [], "teacher"),
            ("BitNet-SFT", "1,5", "bitnet-sft", ["--no_subln"], "teacher"),
            ("BitNet-SFT + SubLN", "5", "bitnet-sft", [], "teacher"),
            ("BitNet-SFT + SubLN + CT", "5,6", "bitnet-sft", [], "ct"),
            ("BitDistill w/o CT", "5", "bitdistill", [], "teacher"),
            ("BitDistill w/o AD (LD only)", "6", "bitdistill", ["--no_ad"], "ct"),
            ("BitDistill w/o LD (AD only)", "6", "bitdistill", ["--no_ld"], "ct"),
            ("BitDistill", "1,5,6", "bitdistill", [], "ct")]   # table order: Tables 1, 5, 6 read top-down
    return [r for r in rows if ablations or r[0] in ("FP16-SFT", "BitNet-SFT", "BitDistill")]


def run_dir(out, task, seed, row):  # "BitDistill w/o AD (LD only)" -> <out>/sst2/seed1/bitdistill-wo-ad-ld-only
    slug = "-".join("".join(c for c in row.lower() if c.isalnum() or c == " ").split())
    return os.path.join(out, task, f"seed{seed}", slug)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: the README's quick start (4.2M-parameter model, ~20 min on 2 cores); smoke: a few "
                        "steps per stage on a 2-layer model, the CI test")
    p.add_argument("--out", default="out/toy", help="everything goes here")
    p.add_argument("--data_dir", default=os.environ.get("BITDISTILL_DATA"),
                   help="offline data folder (default: $BITDISTILL_DATA)")
    p.add_argument("--task", default="sst2", choices=("sst2", "mnli", "qnli"), help="the fine-tuning task")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="fine-tuning seeds (data order, 1.58-bit runs)")
    p.add_argument("--ablations", action="store_true", help="also Table 5 / Table 6 rows and Figure 3a")
    p.add_argument("--gamma_ad", default=None, help="γ for BitDistill (None: distill.py's, 1e5)")
    p.add_argument("--lambda_ld", default=None, help="λ for BitDistill (None: distill.py's, 10)")
    p.add_argument("--distill_layer", default=None, help="student layer for L_AD (None: distill.py's)")
    p.add_argument("--recipe", default="authors", choices=("authors", "paper"),
                   help="passed to every stage after pretraining, whose runs go to <out>/<recipe>/")
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="only print the README's side-by-side table from these toy results folders "
                        "(each holds a results.json of toy.py, e.g. results/toy_recipes/authors)")
    args = p.parse_args(argv)
    if args.compare:
        return print(compare_table(args.compare))
    if not args.data_dir or not os.path.isdir(args.data_dir):
        sys.exit("no data folder: set BITDISTILL_DATA (e.g. export BITDISTILL_DATA=../shared/data) or pass --data_dir")
    pre, out = PRESETS[args.preset], os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data = ["--data_dir", os.path.abspath(args.data_dir)]
    t_start = time.time()

    n_runs = 1 + 1 + args.ablations + len(args.seeds) * len(sft_runs(args.ablations))
    title = lambda i, what: f"[toy {i}/{n_runs}] {what}"
    # 0. vocabulary and model config
    tok = make_tokenizer(args.data_dir, pre["vocab"], out)
    cfg = os.path.join(out, "tiny.json")
    write_json(cfg, dict(pre["model"], vocab_size=pre["vocab"], tie_word_embeddings=True,
                         rope_theta=10000.0, max_position_embeddings=1024))
    # 1. the full-precision "LLM", pretrained from scratch
    teacher = os.path.join(out, "pretrain", "ckpt.pt")
    run(["continue_train.py", "--from_scratch", "--model_config", cfg, "--quant", "none", "--tokenizer", tok,
         "--out_dir", os.path.dirname(teacher), "--seed", "0"] + pre["pretrain"] + data,
        os.path.join(out, "pretrain", "DONE"), os.path.join(out, "pretrain.log"),
        title(1, "pretraining the full-precision toy LM (it plays the off-the-shelf model)"))
    open(os.path.join(out, "pretrain", "DONE"), "w").close()
    # 2. stages 1 + 2: SubLN + BitLinear, continued pre-training (and without SubLN for Figure 3a);
    # from here on every stage follows --recipe, in its own folder
    recipe = ["--recipe", args.recipe]
    out = os.path.join(out, args.recipe)
    cts = {"ct": ["--subln"]} | ({"ct_nosubln": ["--no_subln"]} if args.ablations else {})
    for i, (name, flags) in enumerate(cts.items()):
        d = os.path.join(out, name)
        run(["continue_train.py", "--init", teacher, "--quant", "bitnet", "--out_dir", d, "--seed", "1"]
            + recipe + flags + pre["ct"] + data, os.path.join(d, "DONE"), os.path.join(out, name + ".log"),
            title(2 + i, f"stages 1 + 2: 1.58-bit {'with' if i == 0 else 'without'} SubLN, continued pre-training"))
        open(os.path.join(d, "DONE"), "w").close()
    start = {"teacher": teacher, "ct": os.path.join(out, "ct", "ckpt.pt")}
    # the toy LM was pretrained on plain text and never saw chat markup: plain prompts
    recipe += ["--prompt", "plain"]
    # 3-5: FP16-SFT, BitNet-SFT, BitDistill (and the ablations) for each seed
    extra = []
    for flag in ("gamma_ad", "lambda_ld", "distill_layer"):
        if getattr(args, flag) is not None:
            extra += [f"--{flag}", str(getattr(args, flag))]
    i = 1 + len(cts)
    for seed in args.seeds:
        for row, _, method, flags, init in sft_runs(args.ablations):
            i += 1
            d = run_dir(out, args.task, seed, row)
            src = ["--student", start[init]] if method == "bitdistill" else ["--model", start[init]]
            teach = ["--teacher", os.path.join(run_dir(out, args.task, seed, "FP16-SFT"), "ckpt.pt")]
            lr = pre["lr_fp"] if method == "fp16-sft" else pre["lr_bit"]
            run(["distill.py", "--task", args.task, "--method", method, "--out_dir", d, "--seed", str(seed),
                 "--lr", lr] + recipe + src + (teach + extra if method == "bitdistill" else []) + flags
                + pre["sft"] + pre["eval"] + data, os.path.join(d, "results.json"), d + ".log",
                title(i, f"{row}, seed {seed}"))
    print(f"pipeline finished in {(time.time() - t_start) / 60:.1f} min")
    report(args, out)


def compare_table(folders):
    """The README's table: each folder's toy results (mean ± std over seeds, each seed, and the paired
    differences with their 95% interval) side by side, as markdown, from the results files only."""
    res = []
    for d in folders:
        path = os.path.join(d, "results.json")
        try:
            with open(path) as f:
                r = json.load(f)
            assert isinstance(r, dict) and {"recipe", "task", "seeds", "rows", "paired"} <= set(r)
        except (OSError, ValueError, AssertionError):
            raise ValueError(f"{path} is not the results.json of a toy.py run (with its rows and paired "
                             "differences): run python toy.py --out ... first") from None
        res.append(r)
    fmt = lambda v, s: f"{v:.2f}" + ("" if s is None else f" ± {s:.2f}")
    head = [f"`--recipe {r['recipe']}`" for r in res]
    lines = [f"| {res[0]['task'].upper()} validation accuracy (%), seeds {', '.join(map(str, res[0]['seeds']))} | "
             + " | ".join(f"{h} | per seed" for h in head) + " |", "|---|" + "---:|---|" * len(res)]
    for row in [r["row"] for r in res[0]["rows"]]:
        cells = []
        for r in res:
            x = next(y for y in r["rows"] if y["row"] == row)
            cells += [fmt(x["mean"], x["std"]), " / ".join(f"{a:.2f}" for a in x["accs"])]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for pair in [p["pair"] for p in res[0]["paired"]]:
        cells = []
        for r in res:
            p = next(y for y in r["paired"] if y["pair"] == pair)
            ci = "" if p["ci95"] is None else f" [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
            cells += [f"{p['mean']:+.2f}{ci}", " / ".join(f"{d:+.2f}" for d in p["diffs"])]
        lines.append(f"| {pair.replace(' - ', ' − ')} (paired, 95% interval) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # two-sided t, df


def paired_difference(a, b, seeds):
    """a - b seed by seed (the same fine-tuning data order), their mean and 95% t-interval."""
    diffs = [x - y for x, y in zip(a["accs"], b["accs"])]
    mean = statistics.mean(diffs)
    ci = None
    if len(diffs) > 1:
        half = T95.get(len(diffs) - 1, 2.0) * statistics.stdev(diffs) / len(diffs) ** 0.5
        ci = [mean - half, mean + half]
    return dict(pair=f"{a['row']} - {b['row']}", seeds=seeds, diffs=diffs, mean=mean, ci95=ci)


def report(args, out):
    """Mean and spread over seeds per row; Tables 1, 5, 6; results.json/.csv; toy.png."""
    rows = []
    for row, tables, *_ in sft_runs(args.ablations):
        accs = []
        for seed in args.seeds:
            d = run_dir(out, args.task, seed, row)
            with open(os.path.join(d, "results.json")) as f:
                accs.append(json.load(f)["metrics"]["ACC"])
        sd = statistics.stdev(accs) if len(accs) > 1 else None        # undefined for one seed: null
        rows.append(dict(row=row, tables=tables, task=args.task, n_seeds=len(accs), mean=statistics.mean(accs),
                         std=sd, accs=accs))
    for t, title in (("1", "Table 1"), ("5", "Table 5 (stages)"), ("6", "Table 6 (LD / AD)")):
        sel = [r for r in rows if t in r["tables"].split(",")]
        if len(sel) < 2:
            continue
        print(f"\n{title}: {args.task.upper()} validation accuracy (%), mean ± std over {len(args.seeds)} seed(s)")
        for r in sel:
            spread = "n/a" if r["std"] is None else f"{r['std']:.2f}"
            print(f"  {r['row']:<30}{r['mean']:7.2f} ± {spread:<6} seeds {args.seeds}: "
                  + " / ".join(f"{a:.2f}" for a in r["accs"]))
    by = {r["row"]: r for r in rows}
    paired = [paired_difference(by["BitDistill"], by[base], args.seeds) for base in ("BitNet-SFT", "FP16-SFT")]
    print("\nPaired differences (the same seed, point by point), mean with a 95% t-interval:")
    for p in paired:
        ci = "n/a (one seed)" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
        print(f"  {p['pair']:<28}{p['mean']:+7.2f}  {ci}   per seed: " + " / ".join(f"{d:+.2f}" for d in p["diffs"]))
    write_json(os.path.join(out, "results.json"), {
        "provenance": provenance(), "task": args.task, "recipe": args.recipe, "seeds": args.seeds, "rows": rows,
        "paired": paired, "runs": {r["row"]: [run_dir(out, args.task, s, r["row"]) for s in args.seeds] for r in rows}})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "tables", "task", "n_seeds", "mean_acc", "std_acc", "accs"])
    for r in rows:
        w.writerow([r["row"], r["tables"], r["task"], r["n_seeds"], f"{r['mean']:.2f}",
                    "" if r["std"] is None else f"{r['std']:.2f}", " ".join(f"{a:.2f}" for a in r["accs"])])
    write_text(os.path.join(out, "results.csv"), buf.getvalue())
    stage2 = [(os.path.join(out, name, "metrics.json"), label)
              for name, label in (("ct", "with SubLN"), ("ct_nosubln", "without SubLN"))]
    plot_toy(rows, [(p, label) for p, label in stage2 if os.path.exists(p)], os.path.join(out, "toy.png"))
    print(f"wrote {out}/results.json, results.csv, toy.png")


if __name__ == "__main__":
    run_cli(main)
