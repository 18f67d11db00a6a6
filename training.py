"""
The training plumbing both stages share: continue_train.py (stage 2) and distill.py (stage 3) each
import this module and the model code, never each other.

    setup_distributed()   nanoGPT's torchrun/DDP block (gloo on CPU, NCCL on GPUs)
    autocast_context()    bf16 autocast where it is supported, fp32 otherwise
    get_lr()              linear warmup, then cosine decay
    check_finite()        the NaN/inf guard: stop, keep the last good checkpoint
    save_checkpoint()     one atomic torch.save (temp file + os.replace), RNG state included
    read_checkpoint()     opens a model path ONCE: config, weights, tokenizer, kind of model
    load_model()          read_checkpoint + build the model, strictly (HF folder, hub id or our .pt)
    epoch_order()         the seeded shuffle of an epoch, a pure function: resume needs no data state
    run_cli()             the one-line `<script>: error: ...` for bad input, no traceback

    from training import load_model
    model = load_model("out/continue_train/ckpt.pt")   # or "Qwen/Qwen3-0.6B", or an HF folder
"""
import argparse
import functools
import json
import math
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from model import Qwen3, Qwen3Config, resolve_checkpoint_dir
from subln import build_model

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # an HF folder that has one of these has its tokenizer


# ----------------------------------------------------------------------------- processes and precision

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


def resolve_dtype(dtype, device):
    """--dtype auto -> bfloat16 on GPUs that support it, float32 otherwise (CPU included)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def autocast_context(device_type, dtype="bfloat16"):
    """bf16 autocast on CUDA with bf16 support (and on CPU if asked for); float32 otherwise."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32 or (device_type == "cuda" and not torch.cuda.is_bf16_supported()):
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


# ----------------------------------------------------------------------------- schedule and guard

def get_lr(step, max_steps, warmup_steps, lr, min_lr):
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


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


def adamw(model, lr, weight_decay, betas, eps, device):
    """AdamW with weight decay on 2-D weights (linears, embeddings) only, none on norms and biases
    (as nanoGPT and the authors' trainer do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    """The order of n items in epoch `epoch`: a fresh seeded permutation each epoch, the same for
    the same (n, seed, epoch) in every process and after every resume. (n,) int64 numpy array."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------- files and checkpoints

def atomic_write(path, write):
    """write(tmp_path) fills a temp file in the same folder, then os.replace puts it at `path`: a
    crash mid-write never leaves a truncated file behind (the previous one stays intact)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def strict_json(obj):
    """obj with every NaN/inf float replaced by None: strict JSON has no NaN (an undefined value is null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path, obj):
    """Strict JSON (NaN/inf written as null), written atomically."""
    write_text(path, json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")


def save_checkpoint(path, ckpt):
    """One checkpoint dict (model, optimizer, step, config, args, rng, ...), written atomically."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


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


def load_checkpoint(path):
    """One of our checkpoint dicts, on CPU. Clear errors for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: check the path (or train first, "
                                "e.g. with continue_train.py --out_dir ...)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be "
                         "truncated or corrupt") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a bitdistill checkpoint (needs 'model' and 'config' keys)")
    return ckpt


@dataclass
class Checkpoint:
    """What a model path holds, read once. kind "hf": a Hugging Face folder (a hub id is downloaded
    to one); kind "ours": a .pt written by continue_train.py or distill.py, whose whole dict
    (model, optimizer, step, rng, args, ...) is `ckpt`."""
    path: str                 # the file, or the resolved HF folder
    kind: str                 # "hf" or "ours"
    config: Qwen3Config       # .bitnet / .subln say whether it is already a 1.58-bit model
    tokenizer: str | None     # the tokenizer that belongs to it (None: not recorded)
    ckpt: dict | None = None  # kind "ours" only

    @property
    def args(self):
        return (self.ckpt or {}).get("args", {})


def read_checkpoint(path):
    """Open a model path once: one of our .pt files (torch.load) or an HF folder / hub id (config.json)."""
    if os.path.isfile(path) or path.endswith(".pt"):
        ckpt = load_checkpoint(path)
        return Checkpoint(path, "ours", Qwen3Config.from_dict(dict(ckpt["config"])),
                          ckpt.get("args", {}).get("tokenizer"), ckpt)
    folder = resolve_checkpoint_dir(path)
    with open(os.path.join(folder, "config.json")) as f:
        config = Qwen3Config.from_hf(json.load(f))
    has_tok = any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)
    return Checkpoint(folder, "hf", config, os.path.abspath(folder) if has_tok else None)


def model_from(src, dtype=torch.float32):
    """The model of a read_checkpoint(): every key and shape checked (strict)."""
    if src.kind == "hf":
        return Qwen3.from_pretrained(src.path, dtype=dtype)
    model = build_model(src.config)            # BitLinear + SubLN in place when the config says so
    model.load_state_dict(src.ckpt["model"], strict=True)
    return model.to(dtype)


def load_model(path, dtype=torch.float32):
    """A Hugging Face checkpoint (folder or hub id) or one of our .pt checkpoints, loaded strictly."""
    return model_from(read_checkpoint(path), dtype)


# ----------------------------------------------------------------------------- command line

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written and every option's default."""


def run_cli(main, errors=(FileNotFoundError, ValueError, ConnectionError, NonFiniteLossError)):
    """Bad input gets one line `<script>: error: ...` that says what is wrong and how to fix it."""
    try:
        main()
    except errors as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {e}")
