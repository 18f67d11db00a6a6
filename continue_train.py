"""
Stage 2 of BitNet Distillation (arXiv 2510.13998, section 3.2): continued pre-training.

The SubLN-refined 1.58-bit model of stage 1 (subln.py, Eq. 1-5) is trained with the plain
next-token loss on a small general corpus (10B FALCON RefinedWeb tokens in the paper):

    Eq. (7)  L_CT = -1/N Σ_i Σ_t log P_θ(c_{i,t} | c_{i,<t})

Documents are tokenized with the model's tokenizer, joined with <|endoftext|> and packed into
fixed-length blocks; a held-out slice of every file gives validation loss and perplexity.
With --quant none the same loop trains a full-precision model (the toy pipeline's tiny teacher).

The paper's setting: `python continue_train.py` with no arguments converts Qwen/Qwen3-0.6B (stage 1,
--recipe authors: SubLN before all 7 projections) and trains it on FALCON RefinedWeb streamed from
the hub, 10B tokens (with $BITDISTILL_DATA set: on <data_dir>/corpus). On 8 GPUs (the paper gives
only the 10B tokens for this stage; the other hyper-parameters here are ours):
    torchrun --standalone --nproc_per_node=8 continue_train.py --init Qwen/Qwen3-0.6B \\
        --dataset tiiuae/falcon-refinedweb --tokens 10e9 --block_size 2048 --batch_size 8 \\
        --grad_accum 32 --lr 1e-4 --out_dir out/continue_train
Offline on a CPU, `python toy.py` runs this script twice: a tiny full-precision LM from scratch
(--from_scratch --model_config <its tiny.json> --quant none), then its 1.58-bit student (--init).
    torchrun --standalone --nproc_per_node=2 continue_train.py --grad_accum 2 ...         # DDP on CPU (gloo)
    torchrun --standalone --nproc_per_node=2 continue_train.py --grad_accum 2 --fsdp ...  # FSDP (sharded)
    (--grad_accum counts forward passes over all processes: at least the number of processes)
Figure 3a (with / without SubLN): a run with --out_dir out/subln, one with --no_subln --out_dir out/no_subln, then
    python continue_train.py --plot out/subln/metrics.json out/no_subln/metrics.json --plot_out fig3a.png
Written to --out_dir: ckpt.pt (model, optimizer, step, RNG, config, args; loads with
model.load_model), metrics.json + train_log.csv (loss curve, val loss/ppl), loss.png, and with
--plot_weights weights.png (Figure 2: latent weights / Δ before and after). An interrupted run
continues with the same command plus --resume.
"""
import argparse
import csv
import io
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from bitlinear import QUANT_EPS, WEIGHT_QUANTS, check_quantizer, weight_quant_once
from corpus import find_files, get_batch, open_stream, pack_stream, stream_val_tokens, tokenize_corpus, val_blocks
from figures import latent_weights_over_delta, plot_loss_curves, plot_weights
from model import Qwen3Config, load_model, model_from, read_checkpoint
from recipe import RECIPES, apply_recipe
from subln import build_model, convert_to_bitnet
from profiling import Profiler, training_flops_per_token
from tokenizer import load_tokenizer
from harness import (HelpFormatter, check_resume, claim_out_dir, nonneg_float, nonneg_int, positive_float,
                     positive_int, provenance, run_cli, save_checkpoint, write_json, write_text)
from training import (adamw, add_run_args, autocast_context, check_finite, fsdp_shard, full_state_dicts, get_lr,
                      get_rng_state, load_optimizer, resolve_dtype, set_rng_state, setup_distributed, use_compile)

# settings a resumed run must share with the run it continues (--tokens: may grow)
RESUME_KEYS = ("init", "from_scratch", "model_config", "quant", "subln", "subln_at", "weight_quant", "quant_eps",
               "tokens", "block_size",
               "batch_size", "grad_accum", "seed", "lr", "min_lr", "weight_decay", "beta1", "beta2", "dataset",
               "text_field", "val_fraction", "val_docs")


# ----------------------------------------------------------------------------- model and loss

def init_weights(model, std=0.02):
    """From-scratch init (nanoGPT): N(0, 0.02) for linears and embeddings, zero biases."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def build_student(args):
    """--init (HF folder / hub id / our .pt) or --from_scratch --model_config, then Stage 1:
    convert to 1.58-bit BitNet with or without SubLN (--quant bitnet), or keep it (--quant none).
    Returns (model, its tokenizer path: --tokenizer, else the one that belongs to --init)."""
    if args.from_scratch:
        if not args.model_config or not os.path.isfile(args.model_config):
            raise FileNotFoundError(f"--from_scratch needs --model_config, a JSON file of Qwen3Config fields "
                                    f"(got {args.model_config!r})")
        with open(args.model_config) as f:
            model = build_model(Qwen3Config.from_dict(json.load(f)))
        init_weights(model)
        tokenizer = args.tokenizer
    else:
        src = read_checkpoint(args.init)       # opened once: config, weights, tokenizer
        model, tokenizer = model_from(src), args.tokenizer or src.tokenizer
    c, subln_all = model.config, args.subln and args.subln_at == "all"
    if args.quant == "bitnet" and not c.bitnet:
        convert_to_bitnet(model, args.subln, subln_all, args.weight_quant, args.quant_eps)   # Stage 1, Eq. (1)-(5)
    elif args.quant == "bitnet" and (c.subln, c.subln_all) != (args.subln, subln_all):
        raise ValueError(f"{args.init} is already a BitNet with SubLN {subln_layout(c.subln, c.subln_all)}; it "
                         f"cannot be changed to {subln_layout(args.subln, subln_all)}: start from the "
                         "full-precision model, or ask for its layout (--subln_at / --no_subln)")
    elif args.quant == "bitnet" and (c.weight_quant, c.quant_eps) != (args.weight_quant, args.quant_eps):
        raise ValueError(f"{args.init} is already a BitNet quantized by {c.weight_quant} with the ε form "
                         f"{c.quant_eps}: ask for it (--weight_quant {c.weight_quant} --quant_eps {c.quant_eps})")
    elif args.quant == "none" and c.bitnet:
        raise ValueError(f"{args.init} is a 1.58-bit BitNet; --quant none needs a full-precision model")
    if not tokenizer:
        raise ValueError(f"no tokenizer found with the model {args.init or args.model_config!r}: pass --tokenizer "
                         "(a folder with tokenizer.json, e.g. ../shared/data/tokenizers/qwen3)")
    return model, tokenizer


def subln_layout(subln, subln_all):
    return "before all 7 projections" if subln_all else "before o_proj, down_proj" if subln else "nowhere"


def next_token_loss(logits, targets):
    # Eq. (7): -log P_θ(c_t | c_<t), averaged over the tokens of the batch (the paper's sum over t
    # divided by N only rescales the learning rate). logits (B, T, V), targets (B, T).
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, val, args, ctx, device, rank, world_size, verbose):
    """Mean next-token loss over the first eval_iters * batch_size validation blocks (the same
    blocks for any world size: rank r takes blocks r, r + world, ...). Called with the model
    uncompiled: compiling it would add a no_grad graph (and one per shorter last batch), a one-off
    stall longer than the evaluation itself on a GPU."""
    model.eval()
    n = min((len(val) - 1) // args.block_size, args.eval_iters * args.batch_size)
    mine = list(range(rank, n, world_size))
    total = torch.zeros(2, device=device)                                        # (loss sum, tokens)
    for i in tqdm(range(0, len(mine), args.batch_size), desc="validation", leave=False, disable=not verbose):
        x = val_blocks(val, args.block_size, mine[i:i + args.batch_size]).to(device)  # (b, T+1)
        with ctx:
            logits = model(x[:, :-1])
        total[0] += next_token_loss(logits, x[:, 1:]) * x[:, 1:].numel()
        total[1] += x[:, 1:].numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- logs

def run_label(args, config):
    if args.label:
        return args.label
    if not config.bitnet:
        return "full precision"
    subln = "SubLN before all 7" if config.subln_all else "SubLN" if config.subln else "no SubLN"
    return f"1.58-bit, {subln}" + ("" if config.weight_quant == "absmean" else f" ({config.weight_quant})")


def save_metrics(args, log, label):
    """metrics.json (the loss curve, validation loss/ppl, where it came from) and train_log.csv, atomically."""
    out_dir = args.out_dir
    write_json(os.path.join(out_dir, "metrics.json"),
               {"label": label, **log, "provenance": provenance(args.started), "args": vars(args)})
    val = {r["step"]: r for r in log["val"]}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "tokens", "loss", "lr", "tok_per_s", "val_loss", "val_ppl"])
    for r in log["train"]:
        v = val.get(r["step"], {})
        w.writerow([r["step"], r["tokens"], r["loss"], r["lr"], r["tok_per_s"], v.get("loss", ""), v.get("ppl", "")])
    write_text(os.path.join(out_dir, "train_log.csv"), buf.getvalue())


# ----------------------------------------------------------------------------- the run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--init", "--model", default="Qwen/Qwen3-0.6B",
                   help="the model to convert: HF checkpoint folder or hub id, a .gguf or smollm2 (gguf_model.py), or our .pt")
    p.add_argument("--from_scratch", action="store_true", help="random init from --model_config (toy teacher)")
    p.add_argument("--model_config", default=None, help="JSON with Qwen3Config fields, for --from_scratch")
    p.add_argument("--quant", default="bitnet", choices=("bitnet", "none"), help="1.58-bit (Stage 1) or full precision")
    p.add_argument("--subln", action="store_true", default=True, help="insert SubLN, Eq. (4)-(5) (default)")
    p.add_argument("--no_subln", dest="subln", action="store_false", help="no SubLN (the Table 5 / Fig. 3a ablation)")
    p.add_argument("--subln_at", default=None, choices=("all", "o_down"),
                   help="SubLN before all 7 projections (the authors' released runs) or only before o_proj and "
                        "down_proj (the paper's Eq. 4-5); default: --recipe's")
    p.add_argument("--weight_quant", default="absmean", choices=WEIGHT_QUANTS,
                   help="the weight quantizer (Table 4; bitlinear.py): absmean is Eq. (1)-(2), the others the authors' "
                        "code's (gptq and awq: functions of W alone, no calibration data)")
    p.add_argument("--quant_eps", default=None, choices=QUANT_EPS,
                   help="ε in Eq. (1) and (3): add (Δ + ε, the paper) or clamp (max(Δ, ε), the authors' code); "
                        "default: --recipe's")
    p.add_argument("--recipe", default="authors", choices=sorted(RECIPES),
                   help="authors: the released code's choices; paper: the paper's text (recipe.py, README)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / .tiktoken (default: the --init checkpoint's)")
    p.add_argument("--data", nargs="+", default=None, help="offline corpus: .jsonl ('text' field) / text files or folders")
    p.add_argument("--data_dir", default=os.environ.get("BITDISTILL_DATA"),
                   help="offline data folder; --data defaults to <data_dir>/corpus (default: $BITDISTILL_DATA)")
    p.add_argument("--dataset", default=None,
                   help="stream this hub dataset; None: --data, else <--data_dir>/corpus, else tiiuae/falcon-refinedweb")
    p.add_argument("--text_field", default="content", help="text column of --dataset (falcon: content)")
    p.add_argument("--val_fraction", type=nonneg_float, default=0.05, help="held-out tail of every corpus file")
    p.add_argument("--val_docs", type=positive_int, default=200, help="--dataset: first N streamed documents are validation")
    p.add_argument("--tokens", type=positive_float, default=10e9, help="training token budget (paper: 10B)")
    p.add_argument("--block_size", type=positive_int, default=2048, help="tokens per packed sequence")
    p.add_argument("--batch_size", type=positive_int, default=8, help="sequences per forward pass, per process")
    p.add_argument("--grad_accum", type=positive_int, default=1,
                   help="forward passes per optimizer step, over all processes (divided by the world size)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate")
    p.add_argument("--min_lr", type=nonneg_float, default=None, help="end of the cosine (default: lr / 10)")
    p.add_argument("--warmup_steps", type=nonneg_int, default=None, help="linear warmup (default: 2%% of the steps)")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.1, help="AdamW decay on 2-D weights")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW β1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW β2")
    add_run_args(p)     # --grad_clip --dtype --compile --profile --resume --overwrite (training.py)
    p.add_argument("--fsdp", action="store_true",
                   help="torchrun only: shard model, gradients and optimizer over the processes (FSDP2) instead of DDP")
    p.add_argument("--eval_interval", type=positive_int, default=500, help="validate and checkpoint every N steps")
    p.add_argument("--eval_iters", type=positive_int, default=20, help="validation batches of --batch_size blocks")
    p.add_argument("--out_dir", default="out/continue_train", help="ckpt.pt, metrics.json, train_log.csv, loss.png")
    p.add_argument("--seed", type=int, default=1337, help="init (from scratch) and data order")
    p.add_argument("--label", default=None, help="run name in metrics.json / plots (default from quant, subln)")
    p.add_argument("--plot_weights", action="store_true", help="weights.png: latent W/Δ before and after (Figure 2)")
    p.add_argument("--plot", nargs="+", default=None, metavar="METRICS_JSON",
                   help="only plot: overlay the loss curves of these runs (Figure 3a) into --plot_out")
    p.add_argument("--plot_out", default="loss.png", help="output PNG of --plot")
    args = apply_recipe(p.parse_args(argv), ("subln_at", "quant_eps"))
    check_quantizer(args.weight_quant, args.quant_eps)       # e.g. block with the paper's ε: one line, before loading
    if args.from_scratch:   # --init is not loaded: a results file names what was (--model_config)
        args.init = None
    return args


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    args.started = started
    if args.plot:
        plot_loss_curves(args.plot, args.plot_out)
        print(f"wrote {args.plot_out}")
        return
    if args.val_fraction >= 1:
        raise ValueError(f"--val_fraction {args.val_fraction} leaves nothing to train on: use a fraction below 1")
    ddp, rank, local_rank, world_size, device, master = setup_distributed()
    try:   # rank 0 holds the output folder: writable, not in use, no earlier run replaced unasked
        with claim_out_dir(args.out_dir, args.resume, args.overwrite, ("ckpt.pt", "metrics.json")) \
                if master and not args.profile else nullcontext():      # --profile writes nothing
            train(args, ddp, rank, local_rank, world_size, device, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def budget(args, world_size):
    """One optimizer step sees batch_size * block_size * grad_accum tokens, over all processes.
    Returns (forward passes per step per process, tokens per step, max_steps, warmup, min_lr)."""
    if args.grad_accum % world_size:
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the world size {world_size}")
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size
    max_steps = int(args.tokens) // tokens_per_step
    if max_steps < 1:
        raise ValueError(f"--tokens {int(args.tokens)} is smaller than one optimizer step of {tokens_per_step} "
                         f"tokens (batch_size {args.batch_size} x block_size {args.block_size} x grad_accum "
                         f"{args.grad_accum}): raise --tokens or make the batch smaller")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.02 * max_steps))
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    return args.grad_accum // world_size, tokens_per_step, max_steps, warmup, min_lr


def setup_model(args, ckpt_path, device, ddp, local_rank):
    """Stage 1 applied to --init, or this run's checkpoint when resuming; then FSDP or DDP.
    Returns (model to call, raw model, optimizer, tokenizer path, state of a resumed run)."""
    state = {"step": 0, "log": {"train": [], "val": []}, "docs_read": None}
    if args.resume:
        src = read_checkpoint(ckpt_path)
        check_resume(args, src.args, RESUME_KEYS, grow=("tokens",))
        model, ckpt = model_from(src), src.ckpt
        tokenizer = args.tokenizer or src.tokenizer
        state = {"step": ckpt["step"], "docs_read": ckpt["docs_read"],   # step `step` is redone:
                 "log": {k: [r for r in v if r["step"] < ckpt["step"]] for k, v in ckpt["log"].items()}}
    else:
        model, tokenizer = build_student(args)
    if args.fsdp:   # DDP: a full copy on every device; FSDP: 1/N of it (training.fsdp_shard)
        fsdp_shard(model)
    raw_model = model.to(device)
    optimizer = adamw(raw_model, args.lr, args.weight_decay, (args.beta1, args.beta2), 1e-8, device)  # decay on 2-D weights only
    if args.resume:
        load_optimizer(raw_model, optimizer, ckpt["optimizer"], args.fsdp)
        set_rng_state(ckpt["rng"])
    if args.compile:   # training only: evaluate() runs raw_model eagerly, so no evaluation ever recompiles
        model = torch.compile(model)
    if ddp and not args.fsdp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return model, raw_model, optimizer, tokenizer, state



def setup_data(args, tok, files, ds, rank, world_size, docs_done, master):
    """(next_batch(step, micro) -> (x, y, documents read), validation tokens)."""
    T, G = args.block_size, args.batch_size * args.grad_accum   # G: sequences per step, all processes
    if args.dataset:   # the first --val_docs documents validate; the rest, split over the ranks, train
        from datasets.distributed import split_dataset_by_node
        val = stream_val_tokens(ds, tok, args.val_docs, args.text_field)
        rows = split_dataset_by_node(ds.skip(args.val_docs), rank, world_size)
        stream = pack_stream(rows, tok, T, args.text_field, docs_done[rank] if docs_done else 0)

        def next_batch(step, micro):
            chunks, docs = zip(*[next(stream) for _ in range(args.batch_size)])
            xy = torch.stack(chunks)                                               # (B, T+1)
            return xy[:, :-1], xy[:, 1:], docs[-1]
        return next_batch, val
    train_data, val = tokenize_corpus(files, tok, args.val_fraction, master)
    if (len(train_data) - 1) // T < 1 or (len(val) - 1) // T < 1:
        raise ValueError(f"the corpus has {len(train_data)} training and {len(val)} validation tokens: too "
                         f"few for one block of {T + 1} tokens in each; add text or lower --block_size")
    args.corpus = {"files": files, "train_tokens": len(train_data), "val_tokens": len(val)}   # recorded
    if master:
        print(f"corpus: {len(train_data)} train, {len(val)} val tokens")

    def next_batch(step, micro):   # the sequences of micro-batch `micro` of rank `rank` at this step
        first = step * G + (micro * world_size + rank) * args.batch_size
        return (*get_batch(train_data, range(first, first + args.batch_size), T, args.seed, "cpu"), 0)
    return next_batch, val


def checkpoint(args, ckpt_path, raw_model, optimizer, state, val_loss, tokens_per_step, docs_all, label, master):
    """Every rank takes part (FSDP gathers the full state); rank 0 writes ckpt.pt and the metrics."""
    model_sd, optim_sd = full_state_dicts(raw_model, optimizer, args.fsdp)   # FSDP: gathered on rank 0's CPU
    if master:
        step, log = state["step"], state["log"]
        log["val"].append({"step": step, "tokens": step * tokens_per_step, "loss": val_loss,
                           "ppl": math.exp(min(val_loss, 50))})
        save_checkpoint(ckpt_path, {
            "model": model_sd, "optimizer": optim_sd, "step": step, "config": raw_model.config.to_dict(),
            "args": vars(args), "rng": get_rng_state(), "tokens_seen": step * tokens_per_step, "log": log,
            "docs_read": docs_all})
        save_metrics(args, log, label)
        print(f"step {step}/{args.max_steps} | val loss {val_loss:.4f} | val ppl {log['val'][-1]['ppl']:.2f}"
              f" | saved {ckpt_path}")


def train(args, ddp, rank, local_rank, world_size, device, master):
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over processes: run it under torchrun "
                         "(torchrun --standalone --nproc_per_node=N continue_train.py --fsdp ...)")
    accum, tokens_per_step, args.max_steps, warmup, min_lr = budget(args, world_size)
    args.max_steps = args.profile + 1 if args.profile else args.max_steps   # --profile: 1 warm-up + N steps
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not (args.dataset or args.data or args.data_dir):     # no local corpus: the paper's, streamed
        args.dataset = "tiiuae/falcon-refinedweb"
    files = None if args.dataset else find_files(args.data, args.data_dir)  # fail fast on a bad corpus
    ds = open_stream(args.dataset) if args.dataset else None               # ... or an unreachable hub
    torch.manual_seed(args.seed)                               # the same from-scratch init on every rank
    args.compile = use_compile(args.compile, device)
    model, raw_model, optimizer, args.tokenizer, state = setup_model(args, ckpt_path, device, ddp, local_rank)
    tok = load_tokenizer(args.tokenizer)
    if tok.n_vocab > raw_model.config.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {tok.n_vocab} tokens but the model only "
                         f"{raw_model.config.vocab_size} embeddings: pick the model's own tokenizer")
    weights_before = latent_weights_over_delta(raw_model) if args.plot_weights and master else None
    dtype = resolve_dtype(args.dtype, device)
    ctx = autocast_context(device.type, dtype)
    next_batch, val = setup_data(args, tok, files, ds, rank, world_size, state["docs_read"], master)
    label, step = run_label(args, raw_model.config), state["step"]
    if master:
        if not args.profile:
            os.makedirs(args.out_dir, exist_ok=True)
        print(f"{label}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, {device} x "
              f"{world_size}, {dtype} | {args.max_steps} steps of {tokens_per_step} tokens (batch {args.batch_size}"
              f" x block {args.block_size} x accum {args.grad_accum}) | lr {args.lr:g} -> {min_lr:g}, warmup {warmup}")

    # ---- the loop (nanoGPT): validate + checkpoint every eval_interval steps, one optimizer step
    docs_read = state["docs_read"][rank] if state["docs_read"] else 0
    prof = Profiler(args.profile, device, dtype, label)      # --profile only: times from outside the step
    micro_flops = args.batch_size * args.block_size * training_flops_per_token(raw_model.config, args.block_size)

    def forward(x, y):                                          # (B, T) each -> the micro-batch's loss
        with ctx:
            return next_token_loss(model(x), y) / accum         # logits (B, T, V); Eq. (7)
    forward = prof.phase("forward", forward, lambda _: (args.batch_size * args.block_size, micro_flops))
    get_batch = prof.phase("data", next_batch)                  # next_batch itself unless --profile
    prof.watch(optimizer)                                       # optimizer.step timed under --profile

    def train_step(step):
        """One optimizer step: forward + loss (Eq. 7) and backward per micro-batch, clipping, AdamW."""
        lr = get_lr(step, args.max_steps, warmup, args.lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        with weight_quant_once(raw_model, not args.fsdp):   # Q_w(W) once per optimizer step (bitlinear.py)
            for micro in range(accum):
                x, y, docs = get_batch(step, micro)                                     # (B, T) each
                x, y = x.to(device), y.to(device)
                if ddp and not args.fsdp:   # all-reduce the gradients only after the last micro-batch (nanoGPT)
                    model.require_backward_grad_sync = micro == accum - 1
                loss = forward(x, y)   # FSDP: gradients reduce-scattered every micro-batch (none kept whole)
                loss.backward()
                loss_sum += loss.detach()
        if ddp:
            dist.all_reduce(loss_sum)                           # gloo has no AVG: sum, then divide
            loss_sum /= world_size
        lossf = check_finite(loss_sum, step, ckpt_path)         # NaN/inf: stop, keep the last good ckpt
        if args.grad_clip > 0:   # FSDP: the grads are sharded DTensors, the norm is still the global one
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return lossf, lr, docs

    train_step = prof.step(train_step)                          # train_step itself unless --profile
    while True:
        if not args.profile and (step % args.eval_interval == 0 or step == args.max_steps):
            val_loss = evaluate(raw_model, val, args, ctx, device, rank, world_size, master)   # eager
            check_finite(val_loss, step, ckpt_path)             # a model with a NaN loss is never saved
            docs_all = [docs_read] * world_size                 # --dataset: where each rank's stream is
            if ddp and args.dataset:
                dist.all_gather_object(docs_all, docs_read)
            state["step"] = step
            checkpoint(args, ckpt_path, raw_model, optimizer, state, val_loss, tokens_per_step, docs_all,
                       label, master)
        if step == args.max_steps:
            break
        t0 = time.time()
        lossf, lr, docs_read = train_step(step)
        if prof.finished:
            return
        dt = time.time() - t0
        if master:
            state["log"]["train"].append({"step": step, "tokens": (step + 1) * tokens_per_step, "loss": lossf,
                                          "lr": lr, "tok_per_s": round(tokens_per_step / dt)})
            print(f"step {step}/{args.max_steps} | loss {lossf:.4f} | lr {lr:.2e} | "
                  f"{tokens_per_step / dt:,.0f} tok/s | {dt * 1000:.0f} ms")
        step += 1

    if master:
        plot_loss_curves([os.path.join(args.out_dir, "metrics.json")], os.path.join(args.out_dir, "loss.png"),
                         f"{'Continued pre-training' if raw_model.config.bitnet else 'Training'} of this run: {label}")
        if weights_before is not None:
            after = load_model(ckpt_path) if args.fsdp else raw_model   # FSDP: the final full weights
            plot_weights(weights_before, latent_weights_over_delta(after), os.path.join(args.out_dir, "weights.png"))
        print(f"done: {ckpt_path}, metrics.json, train_log.csv, loss.png in {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
