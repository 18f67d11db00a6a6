"""
Multi-head attention-relation distillation, L_AD: Eq. (10)-(12) and Algorithm 1 of BitNet
Distillation (arXiv 2510.13998, section 3.3), following MiniLM / MiniLMv2.

For one layer, each of the Q, K and V states of teacher and student is turned into "relation
heads": the model's heads are concatenated and re-split into `split_heads` (A_r) heads of size D,
so teacher and student need not have the same number of heads or head size. Each relation head
gives an L x L matrix of token-token similarities; a softmax over each row makes it a
distribution, and the student's rows are pulled to the teacher's by KL(teacher || student).

    A ~ Φ, Φ = {Q, K, V}                                                           Eq. (10)
    L_AD = Σ_j α · 1/(A_r·|x|) Σ_a Σ_t KL(R^FP16_{j,a,t} || R^1.58_{j,a,t})          Eq. (11)
    R = Softmax(A·Aᵀ / √d_r)                     (Eq. 12, the option scaled_dot=True)
    R = Softmax(norm(A)·norm(A)ᵀ / temperature)  (Algorithm 1, the default)

Relations span all L tokens in both directions (Algorithm 1 applies no causal mask; Q, K, V of a
causal model already depend only on earlier tokens); only padding is masked.
Used by distill.py on ONE layer (|Υ| = 1, as the paper recommends), with α = 1. With
norm="authors" the loss is divided once more by (layers × A_r), as the authors' released trainer
does (recipe item ad_norm); the paper's text has no such division.

Usage:
    from attn_relation import attention_relation_loss
    loss = attention_relation_loss((q_s, k_s, v_s), (q_t, k_t, v_t), split_heads=16,
                                   attention_mask=mask)   # scalar
Tests: python -m pytest -q test_distill.py -k relation
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def check_split_heads(split_heads, heads, head_dim, what):
    """Algorithm 1 re-splits heads*head_dim into split_heads relation heads of size D."""
    if not isinstance(split_heads, int) or split_heads < 1:
        raise ValueError(f"split_heads must be a positive int, got {split_heads!r}")
    if (heads * head_dim) % split_heads != 0:
        raise ValueError(f"split_heads={split_heads} does not divide heads*head_dim = {heads}*{head_dim} "
                         f"= {heads * head_dim} of the {what} states; pick a divisor of heads*head_dim "
                         "for Q and K/V of both models")


def _check_inputs(student_qkv, teacher_qkv, split_heads, attention_mask):
    """Clear errors for the mistakes a caller is likely to make; returns (B, L)."""
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError(f"expected (Q, K, V) for student and teacher, got {len(student_qkv)} and "
                         f"{len(teacher_qkv)} tensors")
    B, L = student_qkv[0].shape[0], student_qkv[0].shape[2]
    for who, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
        for name, x in zip("QKV", qkv):
            if x.dim() != 4:
                raise ValueError(f"{who} {name} must be (B, heads, L, head_dim), got {tuple(x.shape)}")
            b, h, l, d = x.shape
            if (b, l) != (B, L):
                raise ValueError(f"{who} {name} has (B, L) = {(b, l)} but student Q has {(B, L)}: "
                                 "teacher and student must see the same tokens")
            check_split_heads(split_heads, h, d, f"{who} {name}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must be (B, L) = {(B, L)}, got {tuple(attention_mask.shape)}")
        if (attention_mask.sum(dim=1) == 0).any():
            raise ValueError("attention_mask has a row with no real token")
    return B, L


# Algorithm 1: (B, h, L, d) -> (B, L, h*d) -> (B, L, A_r, D) -> (B, A_r, L, D)
def relation_heads(x, split_heads):
    B, h, L, d = x.shape
    D = h * d // split_heads
    x = x.transpose(1, 2).reshape(B, L, h * d)         # (B, L, h*d): heads concatenated
    return x.view(B, L, split_heads, D).transpose(1, 2)  # (B, A_r, L, D)


# Eq. (12) / Algorithm 1: relation logits of query rows r0:r1 against all L keys.
#   Algorithm 1 (default): norm(A)·norm(A)ᵀ / temperature  -- cosine similarities, in [-1, 1]/τ
#   Eq. (12) (scaled_dot): A·Aᵀ / √d_r                        -- raw dot products, d_r = D
# The two differ in scale only: Algorithm 1 L2-normalises each row of A first, so the logits are
# bounded whatever the magnitude of the states (a 1.58-bit student's activations can be far from
# the teacher's), while Eq. (12) is the attention-style scaling and keeps the magnitudes.
def relation_logits(a_rows, a, scaled_dot, temperature):
    r = a_rows @ a.transpose(-2, -1)                   # (B, A_r, c, D) @ (B, A_r, D, L) -> (B, A_r, c, L)
    return r / (a.shape[-1] ** 0.5) if scaled_dot else r / temperature


# KL(R_teacher || R_student) for each of the query rows r0:r1, summed over valid rows and heads.
def _chunk_kl_sum(s, t, key_valid, row_valid, r0, r1, scaled_dot, temperature):
    s_logits = relation_logits(s[:, :, r0:r1], s, scaled_dot, temperature)  # (B, A_r, c, L)
    t_logits = relation_logits(t[:, :, r0:r1], t, scaled_dot, temperature)  # (B, A_r, c, L)
    # padded keys are left out of every softmax
    s_logp = F.log_softmax(s_logits.masked_fill(~key_valid, float("-inf")), dim=-1)
    t_logp = F.log_softmax(t_logits.masked_fill(~key_valid, float("-inf")), dim=-1)
    # Σ_k p_t (log p_t - log p_s); padded keys have p_t = 0 and would give 0·(-inf + inf) = nan.
    # (Algorithm 1 clamps probabilities at 1e-8 before the log; log_softmax needs no clamp.)
    kl = torch.where(key_valid, t_logp.exp() * (t_logp - s_logp), 0.0).sum(-1)  # (B, A_r, c)
    kl = torch.where(row_valid[:, :, r0:r1], kl, 0.0)    # padded query rows leave the average
    return kl.sum(dim=(1, 2))                          # (B,)


# Eq. (11) for ONE of Φ = {Q, K, V}: 1/(A_r·|x|) Σ_a Σ_t KL(R^T_{a,t} || R^S_{a,t}), mean over the batch.
#
# Reduction, to be explicit. Algorithm 1 reshapes the relations to (B·A_r·L, L) and calls
# F.kl_div(..., reduction="batchmean"), which divides the sum by the FIRST dimension of that
# reshaped tensor, i.e. by B·A_r·L rows, not by B: it is the mean KL per (sample, head, token) row.
# That is exactly Eq. (11)'s 1/(A_r·|x|) averaged over the batch, so Algorithm 1 and Eq. (11) agree
# when nothing is padded. With padding we follow Eq. (11) literally: |x| is each sample's number of
# real tokens, the per-sample mean is taken over its A_r·|x| real rows, then averaged over the B
# samples. Scale: because the reduction is the same as Algorithm 1's (a mean per row, not a sum),
# L_AD here is on the same scale as the loss the paper's γ = 1e5 (classification) / 1e3 (CNN/DM)
# was tuned for. The other reading, a sum over rows divided by B, would be A_r·L (~10^4) times
# larger and would make γ = 1e5 absurd. Softmax rows of cosine similarities / τ=1 are close to
# uniform, so the per-row KL is small once the student roughly follows the teacher; at the very
# start (or for tiny random models) it can be ~0.1, where γ·L_AD dominates L_CE.
def relation_kl(s, t, mask, scaled_dot, temperature, chunk_size):
    B, _, L, _ = s.shape
    key_valid = mask[:, None, None, :]                 # (B, 1, 1, L)
    row_valid = mask[:, None, :]                       # (B, 1, L)
    total = s.new_zeros(B)                             # (B,) Σ over real rows and heads
    for r0 in range(0, L, chunk_size):
        r1 = min(r0 + chunk_size, L)
        args = (s, t, key_valid, row_valid, r0, r1, scaled_dot, temperature)
        if torch.is_grad_enabled() and s.requires_grad:
            # recompute the (B, A_r, c, L) chunk in backward instead of keeping all of them:
            # memory stays O(c·L) per head instead of O(L·L)
            total = total + checkpoint(_chunk_kl_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(*args)
    n_rows = s.shape[1] * mask.sum(dim=1)              # (B,) A_r·|x| per sample
    return (total / n_rows).mean()


def attention_relation_loss(student_qkv, teacher_qkv, split_heads, temperature=1.0,
                            attention_mask=None, scaled_dot=False, chunk_size=128, norm="paper"):
    """L_AD of Eq. (11) for one layer (α = 1): sum over Q, K, V of the mean relation KL.
    student_qkv, teacher_qkv: (Q, K, V), each (B, heads_j, L, head_dim_j); K and V may have fewer
    heads than Q (GQA, before repeat_kv) and the teacher may be wider than the student.
    attention_mask: (B, L), 1 = real token, 0 = padding (left or right). Returns a float32 scalar.
    norm "paper": Eq. (11) / Algorithm 1 as printed. norm "authors": then divided once more by
    (distilled layers × A_r) = A_r here (|Υ| = 1), as the authors' trainer does (their trainer.py),
    which makes the same γ A_r times weaker. The authors' code masks no padding; we always do."""
    if norm not in ("paper", "authors"):
        raise ValueError(f"norm must be 'paper' or 'authors', got {norm!r}")
    B, L = _check_inputs(student_qkv, teacher_qkv, split_heads, attention_mask)
    device = student_qkv[0].device
    mask = (torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool))
    loss = torch.zeros((), device=device)
    # relations, softmax and KL in fp32 even when the forward ran under bf16 autocast
    with torch.autocast(device_type=device.type, enabled=False):
        for s, t in zip(student_qkv, teacher_qkv):     # Eq. (10): Φ = {Q, K, V}, Σ_j with α = 1
            s = relation_heads(s.float(), split_heads)  # (B, A_r, L, D)
            t = relation_heads(t.float().to(device), split_heads)  # (B, A_r, L, D')
            # padded positions are zeroed so whatever sits under the mask cannot reach the loss
            s = s.masked_fill(~mask[:, None, :, None], 0.0)
            t = t.masked_fill(~mask[:, None, :, None], 0.0)
            if not scaled_dot:
                s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)  # Algorithm 1
            loss = loss + relation_kl(s, t, mask, scaled_dot, temperature, chunk_size)
    n_layers = 1                                       # |Υ|: one distilled layer per call
    return loss / (n_layers * split_heads) if norm == "authors" else loss


# Algorithm 1 as printed in the paper, the reference the function above is tested against.
def algorithm1_reference(student_states, teacher_states, split_heads, temperature=1.0, scaled_dot=False):
    """Algorithm 1 of the paper as printed, loop by loop: no chunks, no padding mask, the
    (B·A_r·L, L) relations materialised at once, F.kl_div(..., reduction='batchmean') and the
    clamp(1e-8). scaled_dot: Eq. (12) instead. attention_relation_loss above (chunked,
    padding-aware: the one training runs) equals it on unpadded rows (test_distill)."""
    loss = 0.0
    for i in range(3):
        s_values, t_values = student_states[i], teacher_states[i]
        B, L = s_values.shape[0], s_values.shape[2]
        rel = []
        for x in (s_values, t_values):
            D = x.shape[1] * x.shape[3] // split_heads
            x = x.transpose(1, 2).reshape(B, L, split_heads, D).transpose(1, 2)   # (B, A_r, L, D)
            if scaled_dot:
                rel.append((x @ x.transpose(-2, -1) / math.sqrt(D)).reshape(-1, L))
            else:
                x = F.normalize(x, dim=-1)
                rel.append((x @ x.transpose(-2, -1) / temperature).reshape(-1, L))
        s_prob = F.softmax(rel[0], dim=-1).clamp(min=1e-8)             # (B·A_r·L, L)
        t_prob = F.softmax(rel[1], dim=-1).clamp(min=1e-8)
        loss = loss + F.kl_div(torch.log(s_prob), t_prob, reduction="batchmean", log_target=False)
    return loss
