"""
The losses of stage 3 (arXiv 2510.13998, section 3.3): Eq. (14) L_CE over the answer tokens,
Eq. (8)-(9) L_LD, the logits distillation at temperature τ, and Eq. (13), their sum with
attn_relation.py's L_AD. Each in the paper's form and the authors' released form (recipe.py).

MEMORY. The logits are (B, T, V) with V = 151,936 for Qwen3: one fp32 copy at batch 32 x 512 is
10 GB. So the two logits losses never select or convert such a tensor whole: chunked_sum walks it
sample by sample, `chunk` positions at a time (views, no copy), converts only that chunk to fp32,
and recomputes the chunk in the backward pass (torch.utils.checkpoint) instead of keeping its
temporaries: one chunk's (chunk, V) fp32 tensors at a time, for student and teacher alike. Where
that fp32 copy would pass WHOLE_BYTES, distill.forward_both hands these losses a model.HeadLogits in
place of the logits: the models stop at their final hidden states and the lm_head itself runs chunk
by chunk here (Gemma 3's 262,144-token vocabulary: never 32 x 512 x V logits at once).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attn_relation import attention_relation_loss

LOSS_CHUNK = 512          # positions per chunk: ~0.3 GB per fp32 (chunk, V) temporary at V = 151,936
WHOLE_BYTES = 256 << 20   # below this (an fp32 copy of all the logits), one pass: no recompute to pay


def chunked_sum(fn, tensors, sel, chunk=None):
    """Σ over samples b and position chunks [t0, t1) of fn(x[b, t0:t1] for x in tensors, sel[b, t0:t1]).
    tensors: (B, T, ...) each (logits, targets); sel (B, T) bool: the positions that count. With
    gradients on, each chunk is recomputed in backward rather than stored. chunk None: the whole
    batch in one pass when its fp32 logits would take under WHOLE_BYTES (small vocabularies, the
    toy), else LOSS_CHUNK."""
    B, T = sel.shape
    if chunk is None and sel.numel() * tensors[0].shape[-1] * 4 <= WHOLE_BYTES:
        return fn(*[x.reshape(B * T, *x.shape[2:]) for x in tensors], sel.reshape(-1))
    chunk = chunk or LOSS_CHUNK
    total = torch.zeros((), device=sel.device)
    for b in range(B):
        for t0 in range(0, T, chunk):
            args = [x[b, t0:t0 + chunk] for x in tensors] + [sel[b, t0:t0 + chunk]]
            total = total + (checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return total


def _nll_sum(logits, targets, sel):            # (n, V), (n,), (n,) -> Σ -log p(target) over sel
    return F.cross_entropy(logits[sel].float(), targets[sel], reduction="sum")


def _kl_sum(s_logits, t_logits, sel, tau):     # (n, V) each -> Σ KL(P_T || P_S) at τ over sel
    s_logp = F.log_softmax(s_logits[sel].float() / tau, dim=-1)
    t_logp = F.log_softmax(t_logits[sel].float() / tau, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()



# Eq. (14): L_CE = -1/N Σ_i Σ_{t=1}^{|y_i|} log P_θ(y_i^t | x_i)     (form "sample_sum", the text)
# The authors' trainer takes the mean over the answer tokens of the batch (form "token_mean").
def ce_loss(logits, idx, answer_mask, form="sample_sum", chunk=None):
    sel = answer_mask[:, 1:].bool()                    # (B, T-1): logit t predicts token t+1
    nll = chunked_sum(_nll_sum, (logits[:, :-1], idx[:, 1:]), sel, chunk)   # Σ over the answer tokens
    return nll / (idx.shape[0] if form == "sample_sum" else sel.sum().clamp(min=1))


# Eq. (8)-(9): L_LD = 1/N Σ_i KL(P_T(y_i|x_i) || P_S(y_i|x_i)), P = softmax(z / τ).
#   form "paper": the sequence KL token by token (teacher forcing) over the positions that predict
#     the answer tokens (sel_mask = the answer mask), summed per sample, / N; no τ² (Eq. 8 has none).
#   form "authors": the mean KL over every position with sel_mask = 1 (the attention mask: prompt,
#     answer and the last real position, teacher and student at the same positions), times τ²
#     (Hinton's scaling), as the released trainer computes it.
def logits_distill_loss(s_logits, t_logits, sel_mask, tau, form="paper", chunk=None):
    if form == "paper":
        sel = sel_mask[:, 1:].bool()                   # (B, T-1), same positions as ce_loss
        s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
    else:
        sel = sel_mask.bool()                          # (B, T): every real position
    kl = chunked_sum(lambda s, t, m: _kl_sum(s, t, m, tau), (s_logits, t_logits), sel, chunk)  # Σ positions, vocab
    if form == "paper":
        return kl / sel.shape[0]
    return kl / sel.sum().clamp(min=1) * tau ** 2


# Eq. (13): L = L_CE + λ·L_LD + γ·L_AD. s / t: the student's / teacher's outputs on one batch,
# dicts with "logits" (B, T, V) and "qkv" (Q, K, V of the distilled layer, Eq. 10); the teacher's
# entries are None for a term that is switched off (--no_ld, --no_ad, or no teacher at all).
# idx, mask, answer: (B, T) token ids, real-token mask, answer-token mask. The keywords are the
# recipe's forms (recipe.py) and the weights λ, γ; returns L and the unweighted terms, detached.
def distill_loss(s, t, idx, mask, answer, *, ce_form, ld_form, tau, lambda_ld, split_heads, ad_temperature,
                 ad_scaled_dot, ad_norm, gamma_ad):
    terms = {"ce": ce_loss(s["logits"], idx, answer, ce_form)}                              # Eq. (14)
    if t["logits"] is not None:
        terms["ld"] = logits_distill_loss(s["logits"], t["logits"], answer if ld_form == "paper" else mask,
                                          tau, ld_form)                                      # Eq. (8)-(9)
    if t["qkv"] is not None:
        terms["ad"] = attention_relation_loss(s["qkv"], t["qkv"], split_heads, ad_temperature,
                                              attention_mask=mask, scaled_dot=ad_scaled_dot,
                                              norm=ad_norm)                                  # Eq. (10)-(12)
    loss = terms["ce"] + lambda_ld * terms.get("ld", 0.0) + gamma_ad * terms.get("ad", 0.0)
    return loss, {k: v.detach() for k, v in terms.items()}
