"""
Stage 2 of BitNet Distillation (arXiv 2510.13998, section 3.2): continued pre-training.

The SubLN-refined 1.58-bit model of stage 1 (subln.py, Eq. 1-5) is trained with the plain
next-token loss on a small general corpus (10B FALCON RefinedWeb tokens in the paper):

    Eq. (7)  L_CT = -1/N Σ_i Σ_t log P_θ(c_{i,t} | c_{i,<t})

Documents are tokenized with the model's tokenizer, joined with <|endoftext|> and packed into
fixed-length blocks; a held-out slice of every file gives validation loss and perplexity.
With --quant none the same loop trains a full-precision model (the toy pipeline's tiny teacher).

The paper's setting, 8 GPUs (one GPU: `python continue_train.py ...`; the paper gives only the 10B
tokens for this stage, the other hyper-parameters here are ours):
    torchrun --standalone --nproc_per_node=8 continue_train.py --init Qwen/Qwen3-0.6B \\
        --dataset tiiuae/falcon-refinedweb --tokens 10e9 --block_size 2048 --batch_size 8 \\
        --grad_accum 32 --lr 1e-4 --out_dir out/continue_train
Offline on CPU, the toy pipeline (corpus: $BITDISTILL_DATA/corpus, i.e. ../shared/data/corpus):
    # tiny.json = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
    #   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 10000.0,
    #   "tie_word_embeddings": true, "max_position_embeddings": 1024}
    export BITDISTILL_DATA=../shared/data
    python continue_train.py --from_scratch --model_config tiny.json --quant none \\
        --tokenizer ../shared/data/tokenizers/qwen3 --tokens 12800 --block_size 64 --batch_size 4 \\
        --lr 3e-3 --eval_interval 10 --eval_iters 4 --out_dir out/tiny_teacher   # full-precision teacher
    python continue_train.py --init out/tiny_teacher/ckpt.pt --tokens 12800 --block_size 64 --batch_size 4 \\
        --lr 1e-3 --eval_interval 10 --eval_iters 4 --seed 2 --out_dir out/subln   # its 1.58-bit student
        # (another --seed: another data order; with the teacher's, the student re-reads its blocks)
    torchrun --standalone --nproc_per_node=2 continue_train.py ...         # DDP on CPU (gloo)
    torchrun --standalone --nproc_per_node=2 continue_train.py --fsdp ...  # FSDP (sharded model + optimizer)
Figure 3a (with / without SubLN): the student again with --no_subln --out_dir out/no_subln, then
    python continue_train.py --plot out/subln/metrics.json out/no_subln/metrics.json --plot_out fig3a.png
Written to --out_dir: ckpt.pt (model, optimizer, step, RNG, config, args; loads with
subln.load_model), metrics.json + train_log.csv (loss curve, val loss/ppl), loss.png, and with
--plot_weights weights.png (Figure 2: latent weights / Δ before and after). An interrupted run
continues with the same command plus --resume.
"""
import argparse
import csv
import functools
import glob
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import Qwen3Config, resolve_checkpoint_dir
from subln import build_model, convert_to_bitnet, load_checkpoint, load_model
from tokenizer import load_tokenizer

EOT = "<|endoftext|>"  # document separator (id 151643 in Qwen's vocab)
TEXT_EXTS = (".jsonl", ".json", ".txt", ".raw", ".text", ".md")

# ----------------------------------------------------------------------------- shared helpers
# (distill.py imports these: keep the names and signatures)

def setup_distributed():
    """nanoGPT's DDP block. Under torchrun (RANK set) one process per device; otherwise one process.
    Returns (ddp, rank, local_rank, world_size, device (a torch.device), master_process)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl")
        else:
            device = torch.device("cpu")
            dist.init_process_group(backend="gloo")
    else:
        rank, local_rank, world_size = 0, 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # On x86 CPUs, denormal floats (which BitLinear's backward produces in numbers) made a tiny
    # 1.58-bit model's backward pass 3.6x slower here (13.9 s -> 3.8 s per step); flush them to zero.
    torch.set_flush_denormal(True)
    return ddp, rank, local_rank, world_size, device, rank == 0


def autocast_context(device_type, dtype="bfloat16"):
    """bf16 autocast on CUDA with bf16 support (and on CPU if asked for); float32 otherwise."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32 or (device_type == "cuda" and not torch.cuda.is_bf16_supported()):
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def get_lr(step, max_steps, warmup_steps, lr, min_lr):
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def save_checkpoint(path, ckpt):
    """Atomic: write a temp file in the same folder, then os.replace, so a crash mid-write never
    leaves a truncated checkpoint behind (the previous one stays intact)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


class NonFiniteLossError(RuntimeError):
    """Raised by check_finite: the loss became NaN or inf."""


def check_finite(loss, step, ckpt_path):
    """Stop with a clear message on a NaN/inf loss. The last good checkpoint is never overwritten."""
    value = loss.item() if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        kept = (f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path)
                else f"no checkpoint was written yet (it would be {ckpt_path})")
        raise NonFiniteLossError(
            f"loss is {value} at step {step}: training diverged and was stopped; {kept}. "
            "Resume from it with --resume and a lower --lr (or more --warmup_steps, smaller --grad_clip).")
    return value


def get_rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data

def find_files(args):
    """--data files/folders, else <--data_dir>/corpus. A folder contributes its text files."""
    paths = args.data or ([os.path.join(args.data_dir, "corpus")] if args.data_dir else None)
    if not paths:
        raise ValueError("no training data: pass --data FILES_OR_FOLDERS, set BITDISTILL_DATA (or --data_dir) "
                         "to the offline data folder, or stream with --dataset tiiuae/falcon-refinedweb")
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "*")) if f.endswith(TEXT_EXTS))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p!r} does not exist (--data / --data_dir)")
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_EXTS)}) in {paths}: the corpus is empty")
    return files


def read_documents(path, text_field="text"):
    """A .jsonl/.json file: one document per line (its `text_field`); any other file: one document."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise ValueError(f"{path}, line {n}: no {text_field!r} field (has {sorted(row)[:6]})")
                    yield row[text_field]
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


def tokenize_corpus(files, tok, val_fraction, verbose):
    """Every document -> ids + <|endoftext|>; the last val_fraction of each file's tokens is held
    out for validation (so every source is in both splits). Returns (train, val) uint32 arrays."""
    eot = tok.encode_single_token(EOT)
    train, val = [], []
    for path in files:
        ids = []
        docs = read_documents(path)
        for doc in tqdm(docs, desc=f"tokenizing {os.path.basename(path)}", unit="doc", disable=not verbose):
            if doc.strip():
                ids.extend(tok.encode_ordinary(doc))
                ids.append(eot)
        a = np.array(ids, dtype=np.uint32)
        cut = len(a) - int(len(a) * val_fraction)
        train.append(a[:cut])
        val.append(a[cut:])
    return np.concatenate(train), np.concatenate(val)


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n_blocks):
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def get_batch(data, seq_ids, block_size, seed, device):
    """Sequence i of the run is block epoch_order(seed, i // n)[i % n] of the packed stream: a
    seeded shuffle, new every epoch, and a pure function of i, so resume and DDP need no data state."""
    n = (len(data) - 1) // block_size
    starts = [int(epoch_order(seed, i // n, n)[i % n]) * block_size for i in seq_ids]
    xy = torch.stack([torch.from_numpy(data[s:s + block_size + 1].astype(np.int64)) for s in starts])
    return xy[:, :-1].to(device), xy[:, 1:].to(device)                          # (B, T), (B, T)


def open_stream(args):
    """The real path: the paper's corpus streamed from the hub with `datasets` (needs internet)."""
    try:
        import datasets
        return datasets.load_dataset(args.dataset, split="train", streaming=True)
    except Exception as e:
        raise ConnectionError(f"could not stream {args.dataset!r} ({type(e).__name__}: {str(e)[:200]}). "
                              "It needs internet; offline, train on local files with --data / BITDISTILL_DATA.") from None


def pack_stream(rows, tok, args, docs_done):
    """Documents -> ids + <|endoftext|>, packed into (block_size + 1)-token chunks (consecutive
    chunks share one token, as x/y do). Yields (chunk, documents read so far)."""
    eot, buf, T = tok.encode_single_token(EOT), [], args.block_size
    for n, row in enumerate(rows.skip(docs_done), docs_done + 1):
        buf += tok.encode_ordinary(row[args.text_field]) + [eot]
        while len(buf) >= T + 1:
            yield torch.tensor(buf[:T + 1]), n
            buf = buf[T:]


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
    convert to 1.58-bit BitNet with or without SubLN (--quant bitnet), or keep it (--quant none)."""
    if args.from_scratch:
        if not args.model_config or not os.path.isfile(args.model_config):
            raise FileNotFoundError(f"--from_scratch needs --model_config, a JSON file of Qwen3Config fields "
                                    f"(got {args.model_config!r})")
        with open(args.model_config) as f:
            model = build_model(Qwen3Config.from_dict(json.load(f)))
        init_weights(model)
    elif args.init is None:
        raise ValueError("pass --init (a Hugging Face checkpoint folder or hub id, or one of our .pt "
                         "checkpoints) or --from_scratch --model_config tiny.json")
    else:
        model = load_model(args.init)  # clear FileNotFoundError / ValueError on a bad path
    c = model.config
    if args.quant == "bitnet" and not c.bitnet:
        convert_to_bitnet(model, subln=args.subln)                               # Stage 1, Eq. (1)-(5)
    elif args.quant == "bitnet" and c.subln != args.subln:
        raise ValueError(f"{args.init} is already a BitNet with subln={c.subln}; it cannot be changed "
                         f"to subln={args.subln}: start from the full-precision model")
    elif args.quant == "none" and c.bitnet:
        raise ValueError(f"{args.init} is a 1.58-bit BitNet; --quant none needs a full-precision model")
    return model


def tokenizer_path(args):
    """--tokenizer, else the init checkpoint's folder (HF) or the tokenizer recorded in our .pt."""
    if args.tokenizer:
        return args.tokenizer
    if args.init and os.path.isfile(args.init):
        recorded = load_checkpoint(args.init).get("args", {}).get("tokenizer")
        if recorded:
            return recorded
    elif args.init:
        path = resolve_checkpoint_dir(args.init)
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
            return path
    raise ValueError(f"no tokenizer found with the model {args.init or args.model_config!r}: pass --tokenizer "
                     "(a folder with tokenizer.json, e.g. ../shared/data/tokenizers/qwen3)")


def next_token_loss(logits, targets):
    # Eq. (7): -log P_θ(c_t | c_<t), averaged over the tokens of the batch (the paper's sum over t
    # divided by N only rescales the learning rate). logits (B, T, V), targets (B, T).
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def configure_optimizer(model, args, device):
    """AdamW; weight decay on 2-D weights (linears, embeddings), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                             fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model, val, args, ctx, device, rank, world_size, verbose):
    """Mean next-token loss over the first eval_iters * batch_size validation blocks (the same
    blocks for any world size: rank r takes blocks r, r + world, ...)."""
    model.eval()
    T = args.block_size
    n = min((len(val) - 1) // T, args.eval_iters * args.batch_size)
    mine = list(range(rank, n, world_size))
    total = torch.zeros(2, device=device)                                        # (loss sum, tokens)
    for i in tqdm(range(0, len(mine), args.batch_size), desc="validation", leave=False, disable=not verbose):
        x = torch.stack([torch.from_numpy(val[b * T:b * T + T + 1].astype(np.int64)) for b in mine[i:i + args.batch_size]])
        x = x.to(device)
        with ctx:
            logits = model(x[:, :-1])
        total[0] += next_token_loss(logits, x[:, 1:]) * x[:, 1:].numel()
        total[1] += x[:, 1:].numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------- metrics and plots

def run_label(args, config):
    return args.label or ("full precision" if not config.bitnet else
                          "1.58-bit, SubLN" if config.subln else "1.58-bit, no SubLN")


def save_metrics(out_dir, log, label):
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"label": label, **log}, f, indent=1)
    val = {r["step"]: r for r in log["val"]}
    with open(os.path.join(out_dir, "train_log.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "loss", "lr", "tok_per_s", "val_loss", "val_ppl"])
        for r in log["train"]:
            v = val.get(r["step"], {})
            w.writerow([r["step"], r["tokens"], r["loss"], r["lr"], r["tok_per_s"], v.get("loss", ""), v.get("ppl", "")])


def new_figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(7, 4.5))


def save_figure(fig, ax, out_png, xlabel, ylabel, title):
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)


def plot_curves(metric_files, out_png):
    """Training loss (thin) and validation loss (dots) against steps, one colour per run:
    Figure 3a overlays a run with SubLN and one without."""
    fig, ax = new_figure()
    for i, path in enumerate(metric_files):
        with open(path) as f:
            m = json.load(f)
        color = f"C{i}"
        ax.plot([r["step"] for r in m["train"]], [r["loss"] for r in m["train"]], color=color, lw=1,
                alpha=0.8, label=f"{m['label']} (train)")
        ax.plot([r["step"] for r in m["val"]], [r["loss"] for r in m["val"]], "o--", color=color, ms=4,
                label=f"{m['label']} (val)")
    save_figure(fig, ax, out_png, "step", "next-token loss, Eq. (7)", "Continued pre-training (paper Figure 3a)")


def latent_weights_over_delta(model):
    """All latent linear weights of the blocks, each divided by its Δ = mean|W| (Eq. 1-2): values
    in (-0.5, 0.5) quantize to 0, beyond to ±1. Figure 2 plots this distribution."""
    ws = [m.weight.detach().float() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return torch.cat([(w / w.abs().mean().clamp(min=1e-5)).flatten().cpu() for w in ws]).numpy()


def plot_weights(before, after, out_png):
    fig, ax = new_figure()
    for w, when in ((before, "before"), (after, "after")):
        ax.hist(w, bins=np.linspace(-4, 4, 161), density=True, alpha=0.5, label=f"{when} continued training")
    for b in (-0.5, 0.5):
        ax.axvline(b, color="k", lw=0.8, ls=":")
    save_figure(fig, ax, out_png, "latent weight / Δ   (dotted: rounding boundaries between -1, 0, +1)",
                "density", "Weight distribution (paper Figure 2)")


# ----------------------------------------------------------------------------- the run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None, help="HF checkpoint folder or hub id (e.g. Qwen/Qwen3-0.6B), or our .pt")
    p.add_argument("--from_scratch", action="store_true", help="random init from --model_config (toy teacher)")
    p.add_argument("--model_config", default=None, help="JSON with Qwen3Config fields, for --from_scratch")
    p.add_argument("--quant", default="bitnet", choices=("bitnet", "none"), help="1.58-bit (Stage 1) or full precision")
    p.add_argument("--subln", action="store_true", default=True, help="insert SubLN, Eq. (4)-(5) (default)")
    p.add_argument("--no_subln", dest="subln", action="store_false", help="no SubLN (the Table 5 / Fig. 3a ablation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / .tiktoken (default: the --init checkpoint's)")
    p.add_argument("--data", nargs="+", default=None, help="offline corpus: .jsonl ('text' field) / text files or folders")
    p.add_argument("--data_dir", default=os.environ.get("BITDISTILL_DATA"),
                   help="offline data folder; --data defaults to <data_dir>/corpus (default: $BITDISTILL_DATA)")
    p.add_argument("--dataset", default=None, help="stream a hub dataset instead, e.g. tiiuae/falcon-refinedweb")
    p.add_argument("--text_field", default="content", help="text column of --dataset (falcon: content)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="held-out tail of every corpus file")
    p.add_argument("--val_docs", type=int, default=200, help="--dataset: first N streamed documents are validation")
    p.add_argument("--tokens", type=float, default=10e9, help="training token budget (paper: 10B)")
    p.add_argument("--block_size", type=int, default=2048, help="tokens per packed sequence")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass, per process")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="forward passes per optimizer step, over all processes (divided by the world size)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--min_lr", type=float, default=None, help="end of the cosine (default: lr / 10)")
    p.add_argument("--warmup_steps", type=int, default=None, help="linear warmup (default: 2%% of the steps)")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay on 2-D weights")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW β1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW β2")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype; auto: bfloat16 on GPUs that support it, else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true",
                   help="torchrun only: shard model, gradients and optimizer over the processes (FSDP2) instead of DDP")
    p.add_argument("--eval_interval", type=int, default=500, help="validate and checkpoint every N steps")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches of --batch_size blocks")
    p.add_argument("--out_dir", default="out/continue_train", help="ckpt.pt, metrics.json, train_log.csv, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/ckpt.pt")
    p.add_argument("--seed", type=int, default=1337, help="init (from scratch) and data order")
    p.add_argument("--label", default=None, help="run name in metrics.json / plots (default from quant, subln)")
    p.add_argument("--plot_weights", action="store_true", help="weights.png: latent W/Δ before and after (Figure 2)")
    p.add_argument("--plot", nargs="+", default=None, metavar="METRICS_JSON",
                   help="only plot: overlay the loss curves of these runs (Figure 3a) into --plot_out")
    p.add_argument("--plot_out", default="loss.png", help="output PNG of --plot")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        plot_curves(args.plot, args.plot_out)
        print(f"wrote {args.plot_out}")
        return
    ddp, rank, local_rank, world_size, device, master = setup_distributed()
    try:
        train(args, ddp, rank, local_rank, world_size, device, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args, ddp, rank, local_rank, world_size, device, master):
    # ---- the budget: one optimizer step sees batch_size * block_size * grad_accum tokens
    if args.grad_accum % world_size:
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the world size {world_size}")
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over processes: run it under torchrun "
                         "(torchrun --standalone --nproc_per_node=N continue_train.py --fsdp ...)")
    accum = args.grad_accum // world_size                       # forward passes per step, per process
    T, G = args.block_size, args.batch_size * args.grad_accum   # G: sequences per step, all processes
    tokens_per_step = G * T
    max_steps = int(args.tokens) // tokens_per_step
    if max_steps < 1:
        raise ValueError(f"--tokens {int(args.tokens)} is smaller than one optimizer step of {tokens_per_step} "
                         f"tokens (batch_size {args.batch_size} x block_size {T} x grad_accum "
                         f"{args.grad_accum}): raise --tokens or make the batch smaller")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.02 * max_steps))
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    files = None if args.dataset else find_files(args)         # fail fast on a bad corpus path
    ds = open_stream(args) if args.dataset else None           # ... or an unreachable hub
    torch.manual_seed(args.seed)                               # the same from-scratch init on every rank

    # ---- the model: Stage 1 applied to --init, or this run's checkpoint when resuming
    step, log, docs_done = 0, {"train": [], "val": []}, [0] * world_size
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        model = build_model(Qwen3Config.from_dict(dict(ckpt["config"])))
        model.load_state_dict(ckpt["model"], strict=True)
        step, docs_done = ckpt["step"], ckpt["docs_read"]
        args.tokenizer = args.tokenizer or ckpt["args"]["tokenizer"]
        log = {k: [r for r in ckpt["log"][k] if r["step"] < step] for k in log}  # step `step` is redone
    else:
        model = build_student(args)
        args.tokenizer = tokenizer_path(args)
    tok = load_tokenizer(args.tokenizer)
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {tok.n_vocab} tokens but the model only "
                         f"{model.config.vocab_size} embeddings: pick the model's own tokenizer")
    weights_before = latent_weights_over_delta(model) if args.plot_weights and master else None
    # DDP keeps a full copy of the model, its gradients and AdamW's two moments (~16 bytes per parameter
    # in fp32) on every device: the default while that fits one GPU. FSDP (--fsdp) shards all three over
    # the N processes (~16/N bytes per parameter, plus one block's full weights while it computes), at the
    # cost of all-gathering the weights in every forward and backward: for a student + optimizer too big
    # for one GPU. FSDP2: one unit per transformer block, then the root (embeddings, tied lm_head, norm).
    if args.fsdp:
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)                                     # also moves the shards to `device`
    raw_model = model.to(device)
    optimizer = configure_optimizer(raw_model, args, device)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP: unsharded, on rank 0's CPU
    if args.resume:
        if args.fsdp:   # every rank read the full checkpoint: each keeps its own shard of the moments
            if ckpt["optimizer"]["state"]:                      # (empty in a step-0 checkpoint)
                set_optimizer_state_dict(raw_model, optimizer, ckpt["optimizer"], options=full)
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        del ckpt
    if args.compile:
        model = torch.compile(model)
    if ddp and not args.fsdp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    ctx = autocast_context(device.type, dtype)

    # ---- the data: packed token blocks (offline files), or a stream (the paper's FALCON)
    if args.dataset:   # the first --val_docs documents validate; the rest, split over the ranks, train
        from datasets.distributed import split_dataset_by_node
        eot = tok.encode_single_token(EOT)
        val = np.array([i for row in ds.take(args.val_docs) for i in tok.encode_ordinary(row[args.text_field]) + [eot]],
                       dtype=np.uint32)
        stream = pack_stream(split_dataset_by_node(ds.skip(args.val_docs), rank, world_size), tok, args, docs_done[rank])
    else:
        train_data, val = tokenize_corpus(files, tok, args.val_fraction, master)
        if (len(train_data) - 1) // T < 1 or (len(val) - 1) // T < 1:
            raise ValueError(f"the corpus has {len(train_data)} training and {len(val)} validation tokens: too "
                             f"few for one block of {T + 1} tokens in each; add text or lower --block_size")
    c, label = raw_model.config, run_label(args, raw_model.config)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"{label}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, {device} x "
              f"{world_size}, {dtype} | {max_steps} steps of {tokens_per_step} tokens (batch {args.batch_size} x "
              f"block {T} x accum {args.grad_accum}) | lr {args.lr:g} -> {min_lr:g}, warmup {warmup}"
              + ("" if args.dataset else f" | corpus: {len(train_data)} train, {len(val)} val tokens"))

    # ---- the loop (nanoGPT): validate + checkpoint every eval_interval steps, one optimizer step
    docs_read = docs_done[rank]
    while True:
        if step % args.eval_interval == 0 or step == max_steps:
            val_loss = evaluate(model, val, args, ctx, device, rank, world_size, master)
            check_finite(val_loss, step, ckpt_path)             # a model with a NaN loss is never saved
            docs_all = [docs_read] * world_size                 # --dataset: where each rank's stream is
            if ddp and args.dataset:
                dist.all_gather_object(docs_all, docs_read)
            if args.fsdp:   # collectives: every rank takes part, rank 0 gets the full (unsharded) dicts
                model_sd = get_model_state_dict(raw_model, options=full)
                # before the first step there is no state; asked for it, get_optimizer_state_dict would
                # create it with a dummy optimizer.step(), which advances AdamW's step count
                optim_sd = (get_optimizer_state_dict(raw_model, optimizer, options=full) if optimizer.state
                            else optimizer.state_dict())
            else:
                model_sd, optim_sd = raw_model.state_dict(), optimizer.state_dict()
            if master:
                log["val"].append({"step": step, "tokens": step * tokens_per_step, "loss": val_loss,
                                   "ppl": math.exp(min(val_loss, 50))})
                save_checkpoint(ckpt_path, {
                    "model": model_sd, "optimizer": optim_sd, "step": step,
                    "config": c.to_dict(), "args": vars(args), "rng": get_rng_state(),
                    "tokens_seen": step * tokens_per_step, "log": log, "docs_read": docs_all})
                save_metrics(args.out_dir, log, label)
                print(f"step {step}/{max_steps} | val loss {val_loss:.4f} | val ppl {log['val'][-1]['ppl']:.2f}"
                      f" | saved {ckpt_path}")
        if step == max_steps:
            break
        t0 = time.time()
        lr = get_lr(step, max_steps, warmup, args.lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            if args.dataset:
                chunks, docs = zip(*[next(stream) for _ in range(args.batch_size)])
                xy, docs_read = torch.stack(chunks).to(device), docs[-1]              # (B, T+1)
                x, y = xy[:, :-1], xy[:, 1:]
            else:   # sequences of this step for micro-batch `micro` of rank `rank`
                first = step * G + (micro * world_size + rank) * args.batch_size
                x, y = get_batch(train_data, range(first, first + args.batch_size), T, args.seed, device)
            if ddp and not args.fsdp:   # all-reduce the gradients only after the last micro-batch (nanoGPT)
                model.require_backward_grad_sync = micro == accum - 1
            # FSDP reduce-scatters every micro-batch's gradients (no set_requires_gradient_sync(False)):
            # skipping it would keep full-size unsharded gradients between micro-batches, FSDP's saving lost
            with ctx:
                logits = model(x)                                                    # (B, T, V)
                loss = next_token_loss(logits, y) / accum                           # Eq. (7)
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
        dt = time.time() - t0
        if master:
            log["train"].append({"step": step, "tokens": (step + 1) * tokens_per_step, "loss": lossf, "lr": lr,
                                 "tok_per_s": round(tokens_per_step / dt)})
            print(f"step {step}/{max_steps} | loss {lossf:.4f} | lr {lr:.2e} | "
                  f"{tokens_per_step / dt:,.0f} tok/s | {dt * 1000:.0f} ms")
        step += 1

    if master:
        plot_curves([os.path.join(args.out_dir, "metrics.json")], os.path.join(args.out_dir, "loss.png"))
        if weights_before is not None:
            after = load_model(ckpt_path) if args.fsdp else raw_model   # FSDP: the final full weights
            plot_weights(weights_before, latent_weights_over_delta(after), os.path.join(args.out_dir, "weights.png"))
        print(f"done: {ckpt_path}, metrics.json, train_log.csv, loss.png in {args.out_dir}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, NonFiniteLossError) as e:
        # bad input: say what is wrong and how to fix it, without a traceback
        raise SystemExit(f"continue_train.py: error: {e}")
