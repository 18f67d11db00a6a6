"""
Stage 3 of BitNet Distillation (arXiv 2510.13998, section 3.3 and 4): task fine-tuning of the
1.58-bit student with logits and attention-relation distillation from a full-precision teacher,
and the two baselines of Tables 1-2.

    --method fp16-sft    full-precision model, L = L_CE                      (the teacher, upper baseline)
    --method bitnet-sft  1.58-bit + SubLN (subln.py), L = L_CE               (lower baseline)
    --method bitdistill  1.58-bit student, L = L_CE + λ·L_LD + γ·L_AD         Eq. (13)
        L_CE  Eq. (14): -1/N Σ_i Σ_t log P(y_i^t | x_i), over the answer tokens
        L_LD  Eq. (8)-(9): 1/N Σ_i KL(P_T(y_i|x_i) || P_S(y_i|x_i)) at temperature τ = 5
        L_AD  Eq. (10)-(12), attn_relation.py, on ONE layer (--distill_layer)
--recipe authors (default) runs these as the authors' released code does; --recipe paper as the
paper's text writes them; recipe.py and the README list each item and its own flag.

Each task is causal-LM fine-tuning: a prompt (Qwen's chat template when the tokenizer has it),
the answer as text (the label word, or the CNN/DM highlights) and its end token. Evaluation is
greedy: accuracy, or BLEU (sacrebleu) and ROUGE-1/2/L/Lsum (rouge-score).

The paper's pipeline, one GPU (--model: Qwen/Qwen3-0.6B, --student: stage 2's
out/continue_train/ckpt.pt, --teacher: out/<task>-fp16-sft/ckpt.pt):
    python distill.py --task mnli --method fp16-sft
    python distill.py --task mnli --method bitnet-sft
    python distill.py --task mnli --method bitdistill
8 GPUs:   torchrun --standalone --nproc_per_node=8 distill.py --task mnli --method bitdistill
CPU, offline: python toy.py runs these three on a tiny model (BITDISTILL_DATA=../shared/data);
    torchrun --standalone --nproc_per_node=2 distill.py ...     # DDP on CPU (gloo)
Ablations: --no_ld / --no_ad (Table 6); --student <HF model or fp checkpoint> (no continued
pre-training, converted here) and --no_subln (Table 5); --distill_layer N (Figure 3b);
--teacher <a larger fp16-sft checkpoint> (Figure 3c). --eval_only re-evaluates <out_dir>/ckpt.pt,
--resume continues it. One log line per step: loss = ce + λ·ld + γ·ad, the terms unweighted.
Results print in the layout of Table 1 (classification) or Table 2 (CNN/DM), collected from every
results.json next to --out_dir, and are saved as results.json beside ckpt.pt in --out_dir.
"""
import argparse
import functools
import math
import os
import time
from contextlib import nullcontext

import torch

from bitlinear import QUANT_EPS, WEIGHT_QUANTS, weight_quant_once
from losses import WHOLE_BYTES, distill_loss   # Eq. (8)-(9), (13), (14)
from model import HeadLogits, model_from, read_checkpoint
from recipe import RECIPES, TEACHER_LR, apply_recipe, distill_layers
from subln import convert_to_bitnet
from tasks import (METHODS, TASKS, chat_tokens, collate, collect_results, encode_example, evaluate, get_task,
                   print_table, task_splits, weight_memory_gb)
from profiling import Profiler, training_flops_per_token
from tokenizer import check_same_tokenizer, load_tokenizer
from harness import (HelpFormatter, check_resume, claim_out_dir, nonneg_float, nonneg_int, positive_float,
                     positive_int, provenance, run_cli, save_checkpoint, write_json)
from training import (adamw, add_run_args, autocast_context, check_finite, get_lr, get_rng_state, mark_dynamic_length,
                      micro_batch, resolve_dtype, set_rng_state, setup_distributed, use_compile)

load_tokenizer = functools.lru_cache(maxsize=4)(load_tokenizer)  # teacher and student share one

def unwrapped(m):
    """The Qwen3 inside DDP and torch.compile wrappers (its config and lm_head)."""
    m = getattr(m, "module", m)
    return getattr(m, "_orig_mod", m)


def forward_both(model, teacher, idx, mask, layers, args, ctx):
    """The student's forward (with grad) and the frozen teacher's (no grad) on the same tokens
    (mask: the attention mask, or None: causal only); Q/K/V come back from the distilled layers
    only when L_AD is on."""
    use_ad = teacher is not None and not args.no_ad
    rope = args.qk_capture == "after_rope"
    # logits whose fp32 copy would pass losses.WHOLE_BYTES (Qwen3 at 32 x 512, Gemma 3's 262k vocabulary)
    # are never made whole: the losses apply each lm_head chunk by chunk (model.HeadLogits)
    lazy = idx.numel() * unwrapped(model).config.vocab_size * 4 > WHOLE_BYTES
    logits = lambda m, out: HeadLogits(out, unwrapped(m).lm_head, ctx) if lazy else out    # (B, T, V)
    with ctx:
        out = model(idx, attention_mask=mask, qkv_layer=layers[0] if use_ad else None, qk_after_rope=rope,
                    head=not lazy)
    out = out if use_ad else (out, None)
    s = {"logits": logits(model, out[0]), "qkv": out[1]}
    t = {"logits": None, "qkv": None}
    if teacher is not None:
        with torch.no_grad(), ctx:
            out = teacher(idx, attention_mask=mask, qkv_layer=layers[1] if use_ad else None, qk_after_rope=rope,
                          head=not lazy)
        out = out if use_ad else (out, None)
        t = {"logits": logits(teacher, out[0]), "qkv": out[1]}
        t["logits"] = None if args.no_ld else t["logits"]
    return s, t


def encode_rows(rows, tok, args):
    """The training rows tokenized once, before the first step: (ids, n_prompt) per row."""
    chat = chat_tokens(tok) if args.prompt == "chat" else None
    return [encode_example(tok, args.task, ex, args.max_len, chat) for ex in rows]


def loss_terms(model, teacher, batch, tok, args, device, ctx, layers):
    """Eq. (13) on one micro-batch of encoded rows (encode_rows): returns (L, {'ce', 'ld', 'ad'},
    the terms detached)."""
    seqs, n_prompts = zip(*batch)
    idx, mask, answer = (t.to(device) for t in collate(seqs, tok.eot_token, n_prompts))  # (B, T) each
    if args.compile:                                       # T varies per batch: one graph for every T
        mark_dynamic_length(idx)
    # collate pads on the right: under causal attention no real position ever sees a pad (each comes
    # after it), so the models run without the mask, as SDPA's fused causal kernels; the pads' own
    # outputs change and leave every loss through `mask` (test_speed: equal to the masked forward).
    s, t = forward_both(model, teacher, idx, None, layers, args, ctx)
    loss, terms = distill_loss(s, t, idx, mask, answer, **loss_settings(args))
    return loss, dict(terms, positions=idx.shape)          # (B, T) processed: for --profile's FLOPs


def loss_settings(args):
    """The keywords of losses.distill_loss (Eq. 13) from the command line: the recipe's forms, λ, γ."""
    return dict(ce_form=args.ce_form, ld_form=args.ld_form, tau=args.tau, lambda_ld=args.lambda_ld,
                split_heads=args.split_heads, ad_temperature=args.ad_temperature,
                ad_scaled_dot=args.ad_scaled_dot, ad_norm=args.ad_norm, gamma_ad=args.gamma_ad)


# ----------------------------------------------------------------------------------------------
# Models

def build_student(args, own):
    """(student, tokenizer path). own: this run's checkpoint (--resume, --eval_only), else None:
    the base model (fp16-sft, bitnet-sft) or the stage-2 student (bitdistill), converted to
    1.58 bits on the fly (stage 1, no continued pre-training) when it is full precision."""
    if own is not None:
        args.continued = own.args.get("continued", False)
        return model_from(own), args.tokenizer or own.tokenizer
    path = args.student if args.method == "bitdistill" else args.model
    if args.method == "bitdistill":   # the path not loaded is not recorded: results name what was loaded
        args.model = None
    else:
        args.student = None
    src = read_checkpoint(path)
    args.loaded_from = src.path                   # what was loaded (the resolved folder of a hub id)                   # opened once: config, weights, tokenizer
    model = model_from(src)
    args.continued = model.config.bitnet          # a stage-2 (continue_train.py) 1.58-bit checkpoint
    if args.method != "fp16-sft" and not model.config.bitnet:                                   # stage 1 here
        convert_to_bitnet(model, args.subln, args.subln and args.subln_at == "all", args.weight_quant, args.quant_eps)
    if model.config.bitnet:                                       # what runs, recorded
        args.weight_quant, args.quant_eps = model.config.weight_quant, model.config.quant_eps
    if args.method == "fp16-sft" and model.config.bitnet:
        raise ValueError(f"{path} is a 1.58-bit checkpoint; fp16-sft fine-tunes a full-precision model")
    return model, args.tokenizer or src.tokenizer


def check_pipeline(args):
    """BitDistill needs stage 2's student and the FP16-SFT teacher: say which are missing and the
    exact commands that make them, in order, before anything is loaded."""
    if args.method != "bitdistill" or args.eval_only or args.resume:
        return
    todo = []
    if args.student.endswith(".pt") and not os.path.exists(args.student):
        todo.append(f"`python continue_train.py --model {args.model} --out_dir {os.path.dirname(args.student)}` (stage 2, "
                    f"the student {args.student}; or skip it with --student {args.model})")
    if not (args.no_ld and args.no_ad) and args.teacher.endswith(".pt") and not os.path.exists(args.teacher):
        todo.append(f"`python distill.py --task {args.task} --method fp16-sft --model {args.model} --out_dir "
                    f"{os.path.dirname(args.teacher)}` (the teacher {args.teacher})")
    if todo:
        raise FileNotFoundError("BitDistill starts from earlier runs; run first: " + ", then ".join(todo)
                                + ". Offline, python toy.py runs the whole pipeline at toy scale")


def build_teacher(args, student, tok, device):
    """The fp16-sft model, frozen: eval mode, no gradients, never wrapped in DDP."""
    src = read_checkpoint(args.teacher)
    teacher = model_from(src)
    if teacher.config.bitnet:
        raise ValueError(f"teacher {args.teacher} is a 1.58-bit model: the teacher is the fp16-sft model")
    check_same_tokenizer(student, teacher, tok, load_tokenizer(src.tokenizer) if src.tokenizer else None)
    if src.args.get("prompt", args.prompt) != args.prompt:
        raise ValueError(f"the teacher was fine-tuned on {src.args['prompt']} prompts, this run uses {args.prompt}: "
                         f"pass --prompt {src.args['prompt']} (or retrain the teacher)")
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def build_models(args, device, own=None):
    """(student, teacher or None, tokenizer). The student is trained; the teacher is frozen."""
    model, args.tokenizer = build_student(args, own)
    if args.tokenizer is None:
        raise ValueError(f"{args.student if args.method == 'bitdistill' else args.model} records no "
                         "tokenizer: pass --tokenizer (e.g. the base model's folder)")
    tok = load_tokenizer(args.tokenizer)
    if args.prompt == "auto":                      # Qwen's chat template when the tokenizer has it
        args.prompt = "chat" if chat_tokens(tok) else "plain"
    if args.prompt == "chat" and not chat_tokens(tok):
        raise ValueError(f"--prompt chat: the tokenizer {args.tokenizer} has no chat tokens (<|im_start|>/<|im_end|> "
                         "or <start_of_turn>/<end_of_turn>); use --prompt plain")
    if model.config.vocab_size < tok.n_vocab:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids but the model only {model.config.vocab_size} rows")
    teacher = None
    if args.method == "bitdistill" and not (args.no_ld and args.no_ad) and not args.eval_only:
        teacher = build_teacher(args, model, tok, device)
    return model.to(device), teacher, tok


def method_label(args, config):
    """The row name in Tables 1-2, with the ablations of Tables 5-6 spelled out."""
    label = {"fp16-sft": "FP16-SFT", "bitnet-sft": "BitNet-SFT", "bitdistill": "BitDistill"}[args.method]
    if config.bitnet and not config.subln:
        label += " w/o SubLN"
    if config.bitnet and config.weight_quant != "absmean":        # Table 4: -B, -P, -G, -A
        label += f" ({config.weight_quant})"
    if args.method == "bitdistill":
        label += " w/o CT" * (not args.continued) + " w/o LD" * args.no_ld + " w/o AD" * args.no_ad
    return label


# ----------------------------------------------------------------------------------------------
# Training

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), help="downstream task (required, except with --table)")
    p.add_argument("--table", nargs="+", metavar="DIR", default=None,
                   help="only print Tables 1-2 from these runs (run folders, results.json files or experiment folders)")
    p.add_argument("--method", default="bitdistill", choices=METHODS,
                   help="bitdistill needs the fp16-sft teacher and a stage-2 student first")
    p.add_argument("--recipe", default="authors", choices=sorted(RECIPES),
                   help="authors: the released code's choices; paper: the paper's text (recipe.py, README); "
                        "each item below left at None follows it")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B",
                   help="full-precision base (fp16-sft, bitnet-sft): HF folder or hub id, a .gguf or smollm2, our .pt")
    p.add_argument("--student", default="out/continue_train/ckpt.pt",
                   help="bitdistill student: a continue_train.py checkpoint, or an HF model (converted here)")
    p.add_argument("--teacher", default=None, help="fp16-sft checkpoint (None: out/<task>-fp16-sft/ckpt.pt)")
    p.add_argument("--tokenizer", default=None, help="None: the model's own (HF folder / recorded in ckpt)")
    p.add_argument("--subln", action="store_true", default=True, help="SubLN when converting here, Eq. (4)-(5)")
    p.add_argument("--no_subln", dest="subln", action="store_false", help="no SubLN (the Table 5 ablation)")
    p.add_argument("--subln_at", default=None, choices=("all", "o_down"),
                   help="when converting here: SubLN before all 7 projections or only o_proj/down_proj (a recipe item)")
    p.add_argument("--weight_quant", default="absmean", choices=WEIGHT_QUANTS,
                   help="when converting here: the weight quantizer (Table 4; bitlinear.py); a 1.58-bit student keeps its own")
    p.add_argument("--quant_eps", default=None, choices=QUANT_EPS,
                   help="when converting here: ε in Eq. (1) and (3), add (the paper) or clamp (the authors' code); "
                        "default: --recipe's; a 1.58-bit student keeps its own")
    p.add_argument("--no_ld", action="store_true", help="no logits distillation (Table 6)")
    p.add_argument("--no_ad", action="store_true", help="no attention distillation (Table 6)")
    p.add_argument("--ld_form", default=None, choices=("authors", "paper"),
                   help="L_LD: authors = every non-pad position, token mean, x τ²; paper = Eq. (8)-(9) over the "
                        "answer tokens, Σ per sample / N (items 3, 15)")
    p.add_argument("--ce_form", default=None, choices=("token_mean", "sample_sum"),
                   help="L_CE: mean over the answer tokens, or Eq. (14)'s Σ per sample / N (a recipe item)")
    p.add_argument("--tau", type=positive_float, default=5.0, help="logits distillation temperature, Eq. (9)")
    p.add_argument("--lambda_ld", type=nonneg_float, default=None, help="λ; None: 10 (classification), 1 (CNN/DM)")
    p.add_argument("--gamma_ad", type=nonneg_float, default=None, help="γ; None: 1e5 (classification), 1e3 (CNN/DM)")
    p.add_argument("--ad_norm", default=None, choices=("authors", "paper"),
                   help="L_AD: authors = Eq. (11) then / (layers x A_r); paper = Eq. (11) as printed (a recipe item)")
    p.add_argument("--split_heads", type=nonneg_int, default=None, help="A_r, relation heads (a recipe item); 0: the student's heads")
    p.add_argument("--qk_capture", default=None, choices=("after_rope", "before_rope"),
                   help="Q/K handed to L_AD after or before RoPE (a recipe item)")
    p.add_argument("--distill_layer", default=None,
                   help="student layer for L_AD (Figure 3b); auto: the authors' table, else int(0.8 L) (a recipe item)")
    p.add_argument("--teacher_layer", type=int, default=None, help="None: same relative depth as the student's")
    p.add_argument("--ad_temperature", type=positive_float, default=1.0, help="Algorithm 1 relation temperature")
    p.add_argument("--ad_scaled_dot", action="store_true", help="Eq. (12) A·Aᵀ/√d_r instead of Algorithm 1")
    p.add_argument("--prompt", default=None, choices=("auto", "chat", "plain"),
                   help="auto: Qwen's chat template when the tokenizer has its tokens, else plain text (a recipe item)")
    p.add_argument("--data_dir", default=os.environ.get("BITDISTILL_DATA"),
                   help="offline data folder (env BITDISTILL_DATA); unset = Hugging Face hub")
    p.add_argument("--train_limit", type=nonneg_int, default=0, help="use only the first N training rows (0: all)")
    p.add_argument("--eval_limit", type=nonneg_int, default=0, help="evaluate on the first N evaluation rows (0: all)")
    p.add_argument("--heldout", type=nonneg_int, default=0, help="the last N train rows never train (0: none)")
    p.add_argument("--eval_on", default="validation", choices=("validation", "heldout"),
                   help="score the validation rows (reported) or the --heldout train rows (to choose hyperparameters)")
    p.add_argument("--max_len", type=positive_int, default=512, help="tokens per training example (prompt cut to fit)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="global batch (samples per optimizer step)")
    p.add_argument("--micro_batch_size", type=positive_int, default=4, help="samples per forward, per process")
    p.add_argument("--epochs", type=positive_float, default=None, help="passes over the training rows (a recipe item)")
    p.add_argument("--max_steps", type=nonneg_int, default=0, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=positive_float, default=None, help=f"None: {TEACHER_LR:g} (fp16-sft), else --recipe's (a recipe item)")
    p.add_argument("--min_lr_ratio", type=nonneg_float, default=None, help="the cosine ends at lr x this (a recipe item)")
    p.add_argument("--warmup_ratio", type=nonneg_float, default=None, help="linear warmup, fraction of the steps (a recipe item)")
    p.add_argument("--warmup_steps", type=nonneg_int, default=None, help="overrides --warmup_ratio")
    p.add_argument("--weight_decay", type=nonneg_float, default=None, help="AdamW, not on norms and biases (a recipe item)")
    p.add_argument("--beta2", type=nonneg_float, default=None, help="AdamW β2; β1 0.9, eps 1e-8 (a recipe item)")
    p.add_argument("--gen_len", type=positive_int, default=128, help="CNN/DM generation length (paper: up to 4096)")
    p.add_argument("--eval_batch_size", type=positive_int, default=8, help="prompts per greedy generation batch")
    p.add_argument("--out_dir", default=None, help="None: out/<task>-<method>")
    p.add_argument("--save_every", type=nonneg_int, default=0, help="checkpoint every N steps (0: at the end)")
    add_run_args(p)     # --grad_clip --dtype --compile --profile --resume --overwrite (training.py)
    p.add_argument("--eval_only", action="store_true", help="evaluate <out_dir>/ckpt.pt, no training")
    p.add_argument("--seed", type=int, default=1337, help="data order and initialisation")
    args = p.parse_args(argv)
    if args.table:
        return args
    if args.task is None:
        p.error("the following arguments are required: --task")
    summ = get_task(args.task)["kind"] == "sum"
    args.lambda_ld = args.lambda_ld if args.lambda_ld is not None else (1.0 if summ else 10.0)
    args.gamma_ad = args.gamma_ad if args.gamma_ad is not None else (1e3 if summ else 1e5)
    if args.lr is None and args.method == "fp16-sft":
        args.lr = TEACHER_LR
    apply_recipe(args)
    args.out_dir = args.out_dir or os.path.join("out", f"{args.task}-{args.method}")
    args.teacher = args.teacher or os.path.join(os.path.dirname(args.out_dir), f"{args.task}-fp16-sft", "ckpt.pt")
    return args


def train(args, model, student, teacher, tok, layers, ctx, device, dist, data, own=None):
    """The flat loop: AdamW, warmup + cosine, gradient accumulation, clipping, one line per step.
    own: this run's checkpoint when resuming (model weights already loaded from it)."""
    ddp, rank, world_size, master = dist
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    per_step = args.micro_batch_size * world_size
    if args.batch_size % per_step:
        raise ValueError(f"--batch_size {args.batch_size} must be a multiple of micro_batch_size x "
                         f"processes = {per_step}")
    grad_accum = args.batch_size // per_step
    args.n_train_rows = len(data)
    data = encode_rows(data, tok, args)            # tokenized once; micro_batch picks from these
    max_steps = args.max_steps or math.ceil(args.epochs * len(data) / args.batch_size)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * max_steps)
    opt = adamw(student, args.lr, args.weight_decay, (0.9, args.beta2), 1e-8, device)
    step = 0
    if own is not None:
        opt.load_state_dict(own.ckpt["optimizer"])
        step = own.ckpt["step"]
        set_rng_state(own.ckpt["rng"])
    if master:
        cfg = student.config
        print(f"{args.label} on {args.task}: {len(data)} train rows, steps {step}->{max_steps} of "
              f"{args.batch_size} ({grad_accum} x {args.micro_batch_size} x {world_size} proc), "
              f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params (bitnet={cfg.bitnet}, "
              f"subln={cfg.subln}), lr {args.lr}" + (" (resumed)" if own is not None else "")
              + (f"; teacher {args.teacher}, layer {layers[1]} <- student layer {layers[0]}, "
                 f"λ={args.lambda_ld}, γ={args.gamma_ad}, τ={args.tau}, A_r={args.split_heads}"
                 if teacher is not None else ""))

    def save(step):
        save_checkpoint(ckpt_path, {"model": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                    "config": student.config.to_dict(), "args": vars(args), "rng": get_rng_state()})

    if args.profile:   # one warm-up step and --profile timed ones; nothing saved, nothing evaluated
        step, max_steps = 0, args.profile + 1
    prof = Profiler(args.profile, device, args.dtype, args.label)    # --profile only: times from outside the step
    t_config = teacher.config if teacher is not None else None

    def count(out):   # positions (B, T) and model FLOPs: the student's forward + backward, the teacher's forward
        B, T = out[1]["positions"]
        return B * T, B * T * training_flops_per_token(student.config, T, t_config)
    forward = prof.phase("forward", loss_terms, count)                  # loss_terms itself unless --profile
    prof.watch(opt)                                                     # opt.step timed under --profile

    def train_step(step):
        """One optimizer step: forward + loss (Eq. 13) and backward per micro-batch, clipping, AdamW."""
        lr = get_lr(step, max_steps, warmup, args.lr, args.lr * args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        logged = {}
        with weight_quant_once(student):         # Q_w(W) once per optimizer step (bitlinear.py)
            for micro in range(grad_accum):
                if ddp:  # all-reduce the gradients only on the last micro-step
                    model.require_backward_grad_sync = micro == grad_accum - 1
                batch = micro_batch(data, step, micro, rank, args.micro_batch_size, grad_accum, world_size, args.seed)
                loss, terms = forward(model, teacher, batch, tok, args, device, ctx, layers)   # Eq. (13)
                del terms["positions"]
                (loss / grad_accum).backward()
                for k, v in terms.items():                 # detached 0-dim tensors: no sync here
                    logged[k] = logged.get(k, 0.0) + v / grad_accum
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or float("inf"))  # 0: off
        *values, norm = torch.stack([*logged.values(), norm.float()]).tolist()   # the step's one sync
        logged = dict(zip(logged, values))
        total = logged["ce"] + args.lambda_ld * logged.get("ld", 0.0) + args.gamma_ad * logged.get("ad", 0.0)
        check_finite(total, step, ckpt_path)   # NaN/inf: stop before the optimizer step, keep the last good checkpoint
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, logged, norm, lr

    train_step = prof.step(train_step)                          # train_step itself unless --profile
    student.train()
    while step < max_steps:
        t0 = time.time()
        total, logged, norm, lr = train_step(step)
        step += 1
        if prof.finished:
            return
        if master:  # rank 0's values; loss = ce + λ·ld + γ·ad, the terms printed unweighted
            parts = " | ".join(f"{k} {v:.4g}" for k, v in logged.items())
            print(f"step {step}/{max_steps} | loss {total:.4f} | {parts} | lr {lr:.2e} | "
                  f"norm {norm:.3f} | {(time.time() - t0) * 1000:.0f} ms", flush=True)
            if not args.profile and (step == max_steps or (args.save_every and step % args.save_every == 0)):
                save(step)


def report(args, student, tok, device, ctx, evals):
    """Greedy evaluation on the evaluation rows, results.json beside the checkpoint, Table 1/2 row."""
    metrics, speed, preds = evaluate(student, tok, args.task, evals, args.max_len, args.gen_len, args.eval_batch_size,
                                     device, ctx, chat_tokens(tok) if args.prompt == "chat" else None)
    res = {"provenance": provenance(args.started), "task": args.task, "method": args.method, "label": args.label,
           "metrics": metrics, "eval_on": args.eval_on,
           "speed": speed, "memory_gb": weight_memory_gb(student), "n_eval": len(evals),
           "checkpoint": os.path.abspath(os.path.join(args.out_dir, "ckpt.pt")), "args": vars(args),
           "config": student.config.to_dict(),        # what ran: SubLN layout, quantizer (the args say what was asked)
           "examples": preds[:5]}
    write_json(os.path.join(args.out_dir, "results.json"), res)
    print(f"{args.label} {args.task} ({len(evals)} {args.eval_on} rows): " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    print_table([res])   # this run only; several runs: python distill.py --table DIR ...


# settings a resumed run must share with the run it continues (run length: may grow)
RESUME_KEYS = ("task", "method", "recipe", "batch_size", "seed", "train_limit", "heldout", "max_len", "max_steps", "epochs",
               "lr", "min_lr_ratio", "warmup_ratio", "warmup_steps", "weight_decay", "beta2", "lambda_ld", "gamma_ad",
               "tau", "no_ld", "no_ad", "ld_form", "ce_form", "ad_norm", "qk_capture", "subln", "subln_at")


def main(argv=None):
    started = time.time()
    args = get_args(argv)
    args.started = started
    if args.table:
        return print_table(collect_results(args.table))
    check_pipeline(args)
    ddp, rank, local_rank, world_size, device, master = setup_distributed()
    try:   # rank 0 holds the output folder: writable, not in use, no earlier run replaced unasked
        with claim_out_dir(args.out_dir, args.resume or args.eval_only, args.overwrite, ("ckpt.pt", "results.json")) \
                if master and not args.profile else nullcontext():      # --profile writes nothing
            run(args, ddp, rank, local_rank, world_size, device, master)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def run(args, ddp, rank, local_rank, world_size, device, master):
    torch.manual_seed(args.seed + rank)
    args.dtype = resolve_dtype(args.dtype, device)
    ctx = autocast_context(device.type, args.dtype)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    own = None
    if args.eval_only or args.resume:   # this run's own checkpoint: its weights, row name and tokenizer
        own = read_checkpoint(ckpt_path)
        if args.resume:
            check_resume(args, own.args, RESUME_KEYS, grow=("max_steps", "epochs"))
        args.label, args.prompt = own.args["label"], own.args.get("prompt", "plain")   # as it was trained
        if args.eval_only:
            args.student = args.model = ckpt_path
    student, teacher, tok = build_models(args, device, own)
    if own is None:
        args.label = method_label(args, student.config)
    layers = distill_layers(args, student, teacher)
    model = student
    args.compile = use_compile(args.compile, device) and not args.eval_only
    if args.compile:   # training's forward and backward, and the teacher's forward; evaluation (report) is eager
        model = torch.compile(student)
        teacher = torch.compile(teacher) if teacher is not None else None
    if ddp:  # the student only; the teacher is never wrapped
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    # both checked before training; --eval_on heldout scores train rows that never trained
    data, evals = task_splits(args.task, args.data_dir, args.train_limit, args.heldout, args.eval_on, args.eval_limit)
    if not args.eval_only:
        train(args, model, student, teacher, tok, layers, ctx, device, (ddp, rank, world_size, master), data,
              own if args.resume else None)
    if master and not args.profile:  # evaluation on rank 0 only; the others wait at the barrier below
        report(args, student, tok, device, ctx, evals)
    if ddp:
        torch.distributed.barrier()


if __name__ == "__main__":
    run_cli(main)
