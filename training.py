"""
The training code both stages share: continue_train.py (stage 2) and distill.py (stage 3) each
import this module and the model code, never each other. What keeps a run safe (locks, atomic
writes, provenance, resume checks, the one-line errors) is apart, in harness.py.

    setup_distributed()   nanoGPT's torchrun/DDP block (gloo on CPU, NCCL on GPUs)
    autocast_context()    bf16 autocast where it is supported, fp32 otherwise
    get_lr()              linear warmup, then cosine decay
    adamw()               AdamW, weight decay on 2-D weights only
    check_finite()        the NaN/inf guard: stop, keep the last good checkpoint
    fsdp_shard(), full_state_dicts(), load_optimizer()   FSDP behind three calls (continue_train.py --fsdp)
    add_run_args()        the options both stage scripts take; use_compile(): when to torch.compile
    epoch_order(), micro_batch()   the seeded shuffle of an epoch and one process's micro-batch of it
    get_rng_state(), set_rng_state()   the RNG state a checkpoint carries, as plain lists

Loading a checkpoint (ours, Hugging Face, GGUF) is model.py's, beside from_pretrained.
"""
import argparse
import functools
import math
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from harness import NonFiniteLossError, nonneg_float, nonneg_int


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


# ----------------------------------------------------------------------------- FSDP (continue_train.py --fsdp)
# DDP keeps a full copy of the model, its gradients and AdamW's two moments (~16 bytes per parameter in
# fp32) on every device: the default while that fits one GPU. FSDP shards all three over the N
# processes (~16/N bytes per parameter, plus one block's full weights while it computes), at the cost
# of all-gathering the weights in every forward and backward: for a student + optimizer too big for one
# GPU. A checkpoint is always the full, unsharded state, the same file DDP writes.

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, on rank 0's CPU


def fsdp_shard(model):
    """FSDP2, in place: one unit per transformer block, then the root (embeddings, tied lm_head, norm)."""
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)                                     # also moves the shards to the device


def full_state_dicts(model, optimizer, fsdp):
    """(model, optimizer) state dicts, full; FSDP: gathered on rank 0's CPU, every rank taking part."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    model_sd = get_model_state_dict(model, options=FULL_STATE)
    # before the first step there is no optimizer state; asked for it, FSDP would take a dummy step
    return model_sd, (get_optimizer_state_dict(model, optimizer, options=FULL_STATE) if optimizer.state
                      else optimizer.state_dict())


def load_optimizer(model, optimizer, state, fsdp):
    """A full optimizer state dict into `optimizer`; FSDP: every rank read it, each keeps its shard."""
    if not fsdp:
        optimizer.load_state_dict(state)
    elif state["state"]:
        set_optimizer_state_dict(model, optimizer, state, options=FULL_STATE)


# ----------------------------------------------------------------------------- torch.compile, and the options both stage scripts take

def add_compile_args(p):
    """--compile / --no_compile; neither: on for CUDA devices, off on the CPU (see use_compile)."""
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the training forward and backward; evaluation stays eager "
                        "(None: on for CUDA devices, off on the CPU)")
    p.add_argument("--no_compile", dest="compile", action="store_false", default=argparse.SUPPRESS,
                   help="never torch.compile")


def use_compile(flag, device):
    """On a GPU compiling pays for itself within minutes (2.6x for stage 2 on an H100, docs/speed.md);
    on a CPU the toy runs are over before it would, and the matmuls dominate anyway."""
    return device.type == "cuda" if flag is None else flag


def mark_dynamic_length(*tensors):
    """Stage 3's batches are padded to their longest example, so T changes every step: marked
    dynamic before the first compile, one graph serves every length (no recompile per new T)."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 1)


def add_run_args(p):
    """The run options continue_train.py and distill.py share, declared once."""
    p.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="clip the global grad norm (0: off)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype; auto = bfloat16 on CUDA GPUs that support it, else float32")
    add_compile_args(p)
    p.add_argument("--profile", type=nonneg_int, default=0, metavar="N", help="only time 1 + N optimizer steps: "
                   "tok/s, data/forward/backward/optimizer ms, peak memory, MFU (profiling.py); evaluates and "
                   "writes nothing")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that holds an earlier run")
