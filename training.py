"""
The training code both stages share: continue_train.py (stage 2) and distill.py (stage 3) each
import this module and the model code, never each other. What keeps a run safe (locks, atomic
writes, provenance, resume checks, the one-line errors) is apart, in harness.py.

    setup_distributed()   nanoGPT's torchrun/DDP block (gloo on CPU, NCCL on GPUs)
    autocast_context()    bf16 autocast where it is supported, fp32 otherwise
    get_lr()              linear warmup, then cosine decay
    adamw()               AdamW, weight decay on 2-D weights only
    check_finite()        the NaN/inf guard: stop, keep the last good checkpoint
    epoch_order(), micro_batch()   the seeded shuffle of an epoch and one process's micro-batch of it
    get_rng_state(), set_rng_state()   the RNG state a checkpoint carries, as plain lists
    read_checkpoint(), load_model()   open a model path ONCE (config, weights, tokenizer); build it strictly

    model = training.load_model("out/continue_train/ckpt.pt")   # or "Qwen/Qwen3-0.6B", an HF folder
"""
import functools
import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gguf_model import gguf_source, is_gguf, load_gguf
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
        raise NonFiniteLossError(f"loss is {value} at step {step}: training diverged and was stopped; {kept}. Resume "
                                 "from it with --resume and a lower --lr (or more --warmup_steps, smaller --grad_clip).")
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


def micro_batch(data, step, micro, rank, micro_batch_size, grad_accum, world_size, seed):
    """The samples of one micro-batch, a pure function of (step, micro, rank): each epoch is a fixed
    permutation (seeded by the epoch), so --resume sees exactly the batches it would have seen."""
    start = (step * grad_accum * world_size + micro * world_size + rank) * micro_batch_size
    out = []
    for j in range(start, start + micro_batch_size):
        epoch, pos = divmod(j, len(data))
        out.append(data[int(epoch_order(len(data), seed, epoch)[pos])])
    return out


def get_rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()   # numpy's array as a list: weights_only-safe
    state = {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Checkpoints written before the RNG state was stored as lists hold one numpy array (numpy's RNG
# keys); these are the only globals beyond torch's own that weights_only=True lets through.
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                      getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def load_checkpoint(path):
    """One of our checkpoint dicts, on CPU, read with weights_only=True: a .pt is a pickle, and a
    crafted one would otherwise run code. Clear errors for a missing, unreadable or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: check the path (or train first, "
                                "e.g. with continue_train.py --out_dir ...)")
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({why}); it may be truncated or corrupt, or not a "
                         "bitdistill checkpoint (only tensors and plain values are loaded)") from None
    if isinstance(ckpt, dict) and ckpt.get("format", "").startswith("bitdistill-packed"):
        raise ValueError(f"{path} is a packed model (packed.py --out): run it with packed.py --load")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a bitdistill checkpoint (needs 'model' and 'config' keys)")
    missing = [k for k in CONFIG_KEYS if k not in (ckpt["config"] or {})]
    if missing:
        raise ValueError(f"{path} has an incomplete 'config' (missing {', '.join(missing)}): it is not a "
                         "checkpoint this project wrote, or it was damaged")
    return ckpt


@dataclass
class Checkpoint:
    """What a model path holds, read once. kind "hf": a Hugging Face folder (a hub id is downloaded to one);
    "gguf": a llama.cpp file (gguf_model.py); "ours": a .pt of continue_train.py or distill.py, its dict `ckpt`."""
    path: str                 # the file, or the resolved HF folder
    kind: str                 # "hf", "gguf" or "ours"
    config: Qwen3Config       # .bitnet / .subln say whether it is already a 1.58-bit model
    tokenizer: str | None     # the tokenizer that belongs to it (None: not recorded)
    ckpt: dict | None = None  # kind "ours" only

    @property
    def args(self):
        return (self.ckpt or {}).get("args", {})


def read_checkpoint(path):
    """Open a model path once: our .pt (torch.load), a GGUF (its tokenizer inside) or an HF folder / hub id."""
    if is_gguf(path):
        return Checkpoint(*gguf_source(path))
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
    if src.kind in ("hf", "gguf"):
        return (Qwen3.from_pretrained if src.kind == "hf" else load_gguf)(src.path, dtype=dtype)
    model = build_model(src.config)            # BitLinear + SubLN in place when the config says so
    ours, theirs = set(model.state_dict()), set(src.ckpt["model"])
    if ours != theirs:
        miss, extra = sorted(ours - theirs), sorted(theirs - ours)
        raise ValueError(f"{src.path}: its weights do not fit its config ({len(miss)} missing, e.g. {miss[:2]}; "
                         f"{len(extra)} unexpected, e.g. {extra[:2]}): the file is damaged or from another version")
    try:
        model.load_state_dict(src.ckpt["model"], strict=True)
    except RuntimeError as e:                  # a shape that does not fit
        raise ValueError(f"{src.path}: {str(e).splitlines()[-1].strip()[:300]}") from None
    return model.to(dtype)


def load_model(path, dtype=torch.float32):   # an HF checkpoint (folder or hub id) or our .pt, strictly
    return model_from(read_checkpoint(path), dtype)
