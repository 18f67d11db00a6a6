"""
The recipe: where the paper's text and the authors' released code (microsoft/BitNet pull request
382, folder bitdistill/, the code that produced the paper's tables) differ, and what we do.

    --recipe authors   the default: the released code's choices, item by item
    --recipe paper     the paper's literal text wherever it says something; where the text is
                       silent (optimizer, prompt, Q/K capture point, distilled layer) there is
                       nothing to follow, so both recipes use the authors' values

Every item is also a flag of its own (continue_train.py / distill.py), which wins over --recipe;
the resolved values are saved in each run's checkpoint and results.json. The README's recipe table
gives, per item, the paper's words and the authors' file.

    from recipe import apply_recipe
    apply_recipe(args)   # fills every item left at None from RECIPES[args.recipe]
"""
import math

from attn_relation import check_split_heads

# item: (authors' code, paper's text). Items the paper's text does not settle carry the authors'
# value in both columns.
ITEMS = {
    # stage 1 / 2
    "subln_at":    ("all", "o_down"),            # SubLN before all 7 projections / before o_proj, down_proj (Eq. 4-5)
    "quant_eps":   ("clamp", "add"),              # max(Δ, ε), max(γ, ε) (core.py) / Δ + ε, γ + ε (Eq. 1, 3)
    # stage 3, the losses
    "ad_norm":     ("authors", "paper"),          # L_AD / (layers x A_r) after Algorithm 1's batchmean / Eq. 11 as printed
    "split_heads": (32, None),                    # A_r = 32 / "the number of attention heads" (None: the student's)
    "ld_form":     ("authors", "paper"),          # every non-pad position, token mean, x τ² / answer tokens, Σ/N (Eq. 8-9)
    "ce_form":     ("token_mean", "sample_sum"),  # mean over answer tokens / Σ over answer tokens, 1/N (Eq. 14)
    "qk_capture":  ("after_rope", "after_rope"),  # the paper does not say; the authors take Q/K after RoPE
    "distill_layer": ("auto", "auto"),            # the paper: "a later layer" (Fig. 3b); auto = distill_layer_for()
    "prompt":      ("auto", "auto"),              # not given in the paper; auto = Qwen chat template if the tokenizer has it
    # stage 3, the optimizer (grid-searched in the paper, no values given)
    "lr":          (5e-5, 5e-5),                  # student (Qwen3-0.6B yaml); the fp16-sft teacher: TEACHER_LR
    "epochs":      (3.0, 3.0),                    # passes over the training rows
    "warmup_ratio": (0.05, 0.05),                 # then cosine
    "min_lr_ratio": (0.0, 0.0),                   # cosine decays to 0
    "weight_decay": (0.01, 0.01),                 # not on norms and biases
    "beta2":       (0.999, 0.999),                # AdamW betas (0.9, 0.999), eps 1e-8
}
AUTHORS_SPLIT_HEADS = ITEMS["split_heads"][0]
TEACHER_LR = 1e-5                                 # sft_nli.yaml, the FP16-SFT run
RECIPES = {name: {k: v[i] for k, v in ITEMS.items()} for i, name in enumerate(("authors", "paper"))}

# The layer the authors distil, by (layers, hidden size) of the known Qwen3 sizes (0-based
# index into model.layers, as their trainer indexes its per-layer states)
AUTHORS_LAYER = {(28, 1024): 22,   # Qwen3-0.6B: layers_used_for_distill [22], sft_nli_bitnet_allnorm_distill.yaml
                 (28, 2048): 24}   # Qwen3-1.7B: qwen3-exp.sh


def distill_layer_for(config):
    """The authors' layer for a known Qwen3 size; otherwise the same relative depth, int(0.8 · L)
    (22 of 28), capped at the last layer."""
    L = config.num_hidden_layers
    return AUTHORS_LAYER.get((L, config.hidden_size), min(int(0.8 * L), L - 1))


def relation_heads_for(requested, widths):
    """A_r. The authors' 32 where it divides every Q and K/V width (heads x head_dim) of student and
    teacher, as in Qwen3 (2048 and 1024 for 0.6B); on a model too narrow for it (a toy), the largest
    divisor of 32 that does: gcd(32, widths). Any other value is used as given (and checked)."""
    if requested != AUTHORS_SPLIT_HEADS or all(w % requested == 0 for w in widths):
        return requested
    return math.gcd(requested, *widths)


def apply_recipe(args, items=None):
    """Every recipe item of args that is None (not given on the command line) takes the value of
    RECIPES[args.recipe]. items: the names this script has (default: all it has as attributes)."""
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {args.recipe!r}")
    for k, v in RECIPES[args.recipe].items():
        if (items is None or k in items) and hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- the distilled layers and A_r

def layer_index(i, n_layers, who):
    if not -n_layers <= i < n_layers:
        raise ValueError(f"distill layer {i} is out of range for the {who}'s {n_layers} layers "
                         f"(valid: {-n_layers}..{n_layers - 1})")
    return i % n_layers


def teacher_layer_for(s_layer, n_student, n_teacher):
    """Same relative depth: the student's last layer maps to the teacher's last layer."""
    return round((s_layer + 1) * n_teacher / n_student) - 1


def distill_layers(args, student, teacher):
    """(student layer, teacher layer or None) for L_AD, and A_r, checked before any training."""
    cfg = student.config
    if args.distill_layer in (None, "auto"):           # the authors' layer (recipe.py), e.g. 22 of 28
        args.distill_layer = distill_layer_for(cfg)
    s_layer = layer_index(int(args.distill_layer), cfg.num_hidden_layers, "student")
    if teacher is None:
        return s_layer, None
    t_n = teacher.config.num_hidden_layers
    t_layer = layer_index(args.teacher_layer if args.teacher_layer is not None
                          else teacher_layer_for(s_layer, cfg.num_hidden_layers, t_n), t_n, "teacher")
    args.split_heads = relation_heads_for(args.split_heads or cfg.num_attention_heads,  # A_r (recipe item split_heads)
                                          [c.num_attention_heads * c.head_dim for c in (cfg, teacher.config)]
                                          + [c.num_key_value_heads * c.head_dim for c in (cfg, teacher.config)])
    for who, c in (("student", cfg), ("teacher", teacher.config)):
        check_split_heads(args.split_heads, c.num_attention_heads, c.head_dim, who + " Q")
        check_split_heads(args.split_heads, c.num_key_value_heads, c.head_dim, who + " K/V")
    return s_layer, t_layer
