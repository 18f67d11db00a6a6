"""
Stage-3 tests: the attention-relation loss (Eq. 10-12, Algorithm 1) against a literal
transcription of Algorithm 1, the logits-distillation loss (Eq. 8-9) against a direct KL, a few
steps of each method on real SST-2 rows, the metrics on fixed strings, the clear errors, and one
end-to-end run of distill.py (train, checkpoint, resume, evaluate, results.json).

    BITDISTILL_DATA=../shared/data python -m pytest -q test_distill.py
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import distill
import losses
import recipe
import tasks
from attn_relation import algorithm1_reference, attention_relation_loss, relation_heads
from model import Qwen3, Qwen3Config
from subln import convert_to_bitnet
from training import load_model

TOKENIZER = os.path.abspath(os.path.join(os.environ.get("BITDISTILL_DATA", ""), "tokenizers", "qwen3"))


# ----------------------------------------------------------------------------- Algorithm 1

def random_qkv(B, L, n_head, n_kv, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, L, head_dim, generator=g, dtype=torch.float64).float()
            for n in (n_head, n_kv, n_kv)]


@pytest.mark.parametrize("s_shape,t_shape,split", [
    ((4, 4, 16), (4, 4, 16), 4),    # same shapes, no GQA
    ((4, 2, 16), (8, 2, 16), 4),    # GQA student, teacher with more query heads
    ((4, 2, 16), (8, 4, 32), 8),    # wider teacher: more heads and bigger head_dim
])
@pytest.mark.parametrize("scaled_dot,temperature", [(False, 1.0), (False, 0.5), (True, 1.0)])
def test_relation_loss_equals_algorithm1(s_shape, t_shape, split, scaled_dot, temperature):
    s = random_qkv(3, 11, *s_shape, seed=0)
    t = random_qkv(3, 11, *t_shape, seed=1)
    ours = attention_relation_loss(s, t, split, temperature=temperature, scaled_dot=scaled_dot, chunk_size=4)
    ref = algorithm1_reference(s, t, split, temperature=temperature, scaled_dot=scaled_dot)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.item() > 1e-3


def test_relation_loss_zero_for_identical_states():
    s = random_qkv(2, 9, 4, 2, 16, seed=0)
    assert attention_relation_loss(s, [x.clone() for x in s], 4).item() == pytest.approx(0.0, abs=1e-7)


def test_relation_loss_ignores_padding():
    B, L = 3, 10
    s, t = random_qkv(B, L, 4, 2, 8, seed=0), random_qkv(B, L, 8, 2, 8, seed=1)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 7:] = 0     # right padding
    mask[1, :4] = 0     # left padding
    loss = attention_relation_loss(s, t, 4, attention_mask=mask, chunk_size=3)
    # whatever sits under the mask does not matter ...
    pad = ~mask.bool()[:, None, :, None]
    s2 = [torch.where(pad, torch.randn_like(x) * 100, x) for x in s]
    t2 = [torch.where(pad, torch.randn_like(x) * 100, x) for x in t]
    torch.testing.assert_close(attention_relation_loss(s2, t2, 4, attention_mask=mask), loss)
    # ... and the batch loss is the mean of each sample's loss on its real tokens only (Eq. 11)
    per_sample = []
    for b in range(B):
        keep = mask[b].bool()
        per_sample.append(algorithm1_reference([x[b:b + 1, :, keep] for x in s],
                                               [x[b:b + 1, :, keep] for x in t], 4))
    torch.testing.assert_close(loss, torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-6)


def test_relation_loss_chunked_equals_unchunked_with_grads():
    s = [x.requires_grad_() for x in random_qkv(2, 13, 4, 2, 8, seed=0)]
    t = random_qkv(2, 13, 4, 2, 8, seed=1)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0
    grads = []
    for chunk in (1, 5, 13):
        loss = attention_relation_loss(s, t, 4, attention_mask=mask, chunk_size=chunk)
        grads.append(torch.autograd.grad(loss, s))
        if chunk == 1:
            first = loss.detach()
        torch.testing.assert_close(loss.detach(), first)
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b)


def test_relation_loss_fp32_under_autocast():
    s, t = random_qkv(2, 8, 4, 2, 16, seed=0), random_qkv(2, 8, 4, 2, 16, seed=1)
    ref = attention_relation_loss(s, t, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_relation_loss(s, t, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_relation_loss_errors():
    s, t = random_qkv(2, 8, 4, 2, 6, seed=0), random_qkv(2, 8, 4, 2, 6, seed=1)
    with pytest.raises(ValueError, match="does not divide"):
        attention_relation_loss(s, t, 5)                       # 4*6=24 and 2*6=12: 5 divides neither
    with pytest.raises(ValueError, match="does not divide"):
        attention_relation_loss(s, t, 24)                      # divides Q (24) but not K/V (12)
    with pytest.raises(ValueError, match="same tokens"):
        attention_relation_loss(s, random_qkv(2, 7, 4, 2, 6, seed=1), 4)
    with pytest.raises(ValueError, match="attention_mask"):
        attention_relation_loss(s, t, 4, attention_mask=torch.ones(2, 9))


# ----------------------------------------------------------------------------- L_LD and L_CE

def test_logits_distill_and_ce_against_direct_computation():
    torch.manual_seed(0)
    B, T, V, tau = 3, 6, 11, 5.0
    s_logits, t_logits = torch.randn(B, T, V) * 3, torch.randn(B, T, V) * 3
    idx = torch.randint(0, V, (B, T))
    answer = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 0]])
    kl, ce = 0.0, 0.0
    for b in range(B):
        for t in range(1, T):
            if answer[b, t]:   # logits at t-1 predict token t
                p = F.softmax(t_logits[b, t - 1] / tau, -1)
                q = F.softmax(s_logits[b, t - 1] / tau, -1)
                kl += sum(p[v] * math.log(p[v] / q[v]) for v in range(V))
                ce -= F.log_softmax(s_logits[b, t - 1], -1)[idx[b, t]]
    torch.testing.assert_close(losses.logits_distill_loss(s_logits, t_logits, answer, tau),
                               kl / B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.ce_loss(s_logits, idx, answer), ce / B, rtol=1e-5, atol=1e-6)
    assert losses.logits_distill_loss(t_logits, t_logits, answer, tau).abs().item() < 1e-6


def loop_kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) of two 1-D logit vectors, element by element."""
    p, q = F.softmax(p_logits.double(), -1), F.softmax(q_logits.double(), -1)
    return sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)))


def test_recipe_items_against_loops():
    # each authors'-code item on small tensors, against a loop written from its definition
    torch.manual_seed(2)
    B, T, V, tau = 2, 6, 5, 5.0
    s_logits, t_logits = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    idx = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])          # right padding
    answer = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    # L_LD, authors (items 3, 15): every position with mask 1, teacher and student at the same
    # position (no shift, the last real one included), mean over those positions, times τ²
    rows = [(b, i) for b in range(B) for i in range(T) if mask[b, i]]
    ref = sum(loop_kl(t_logits[b, i] / tau, s_logits[b, i] / tau) for b, i in rows) / len(rows) * tau ** 2
    got = losses.logits_distill_loss(s_logits, t_logits, mask, tau, form="authors")
    assert got.item() == pytest.approx(float(ref), rel=1e-5)
    # L_CE, authors (recipe item ce_form): the mean over the answer tokens of the batch
    nll = [-F.log_softmax(s_logits[b, i - 1].double(), -1)[idx[b, i]] for b in range(B) for i in range(1, T)
           if answer[b, i]]
    assert losses.ce_loss(s_logits, idx, answer, "token_mean").item() == pytest.approx(float(sum(nll) / len(nll)),
                                                                                       rel=1e-5)
    assert losses.ce_loss(s_logits, idx, answer, "sample_sum").item() == pytest.approx(float(sum(nll) / B), rel=1e-5)


def authors_ad_reference(s_qkv, t_qkv, split_heads, n_layers=1):
    """The authors' trainer, row by row: per Φ, the relation KL of every (sample, relation head,
    token) row, divided by B·A_r·L (batchmean), summed over Φ, then divided by layers x A_r."""
    total = 0.0
    for s, t in zip(s_qkv, t_qkv):
        B, L = s.shape[0], s.shape[2]
        rs, rt = relation_heads(s.double(), split_heads), relation_heads(t.double(), split_heads)  # (B, A_r, L, D)
        kl = 0.0
        for b in range(B):
            for a in range(split_heads):
                xs, xt = F.normalize(rs[b, a], dim=-1), F.normalize(rt[b, a], dim=-1)
                for i in range(L):
                    kl += loop_kl(xt[i] @ xt.T, xs[i] @ xs.T)
        total += kl / (B * split_heads * L)
    return total / (n_layers * split_heads)


def test_ad_authors_normalisation_against_a_loop():
    # recipe item ad_norm: at the same γ the authors' L_AD is A_r times smaller than Eq. (11) as printed
    s_qkv, t_qkv = random_qkv(2, 5, 4, 2, 8, seed=5), random_qkv(2, 5, 8, 4, 8, seed=6)
    ref = authors_ad_reference(s_qkv, t_qkv, 8)
    got = attention_relation_loss(s_qkv, t_qkv, 8, norm="authors")
    assert got.item() == pytest.approx(float(ref), rel=1e-5)
    assert attention_relation_loss(s_qkv, t_qkv, 8).item() == pytest.approx(8 * float(ref), rel=1e-5)


@pytest.mark.parametrize("recipe", ["paper", "authors"])
def test_eq13_total_is_ce_plus_lambda_ld_plus_gamma_ad(recipe):
    # Eq. (13) against its three parts computed by independent references: a dropped term, a
    # wrong weight or a sign flip changes the total by far more than the tolerance
    torch.manual_seed(1)
    B, T, V = 2, 5, 7
    s_logits, t_logits = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    idx, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.long)
    answer = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    s_qkv, t_qkv = random_qkv(B, T, 4, 2, 8, seed=3), random_qkv(B, T, 4, 2, 8, seed=4)
    args = distill.get_args(["--task", "sst2", "--lambda_ld", "3", "--gamma_ad", "70", "--recipe", recipe,
                             "--split_heads", "4"])
    ce = losses.ce_loss(s_logits, idx, answer, args.ce_form)            # pinned by the tests above
    if recipe == "paper":
        ld = losses.logits_distill_loss(s_logits, t_logits, answer, args.tau)   # pinned above
        ad = algorithm1_reference(s_qkv, t_qkv, 4)                               # Algorithm 1 as printed
    else:
        ld = losses.logits_distill_loss(s_logits, t_logits, mask, args.tau, "authors")
        ad = authors_ad_reference(s_qkv, t_qkv, 4)
    assert min(ce, 3 * ld, 70 * ad) > 0.05                                       # every term matters
    loss, terms = losses.distill_loss({"logits": s_logits, "qkv": s_qkv}, {"logits": t_logits, "qkv": t_qkv},
                                       idx, mask, answer, **distill.loss_settings(args))
    assert loss.item() == pytest.approx(float(ce + 3 * ld + 70 * ad), rel=1e-5)
    assert {k: float(v) for k, v in terms.items()} == pytest.approx({"ce": float(ce), "ld": float(ld), "ad": float(ad)},
                                                                    rel=1e-5)
    # a switched-off term (teacher output None) leaves the sum, and only it
    loss, terms = losses.distill_loss({"logits": s_logits, "qkv": s_qkv}, {"logits": None, "qkv": t_qkv},
                                       idx, mask, answer, **distill.loss_settings(args))
    assert loss.item() == pytest.approx(float(ce + 70 * ad), rel=1e-5) and set(terms) == {"ce", "ad"}


# ----------------------------------------------------------------------------- models and training

def tiny_config(**kw):
    c = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    c.update(kw)
    return Qwen3Config(**c)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Qwen3(tiny_config(**kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    return m


def save_tiny(path, model):
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(),
                "args": {"tokenizer": TOKENIZER}}, path)
    return str(path)


class SmallVocab:
    """The real Qwen3 tokenizer with its ids mapped onto the few ids that `texts` use, so a tiny
    model needs a 100-row embedding instead of 151,936 (the lm_head would dominate the test)."""

    def __init__(self, tok, texts):
        self.tok = tok
        used = sorted({i for s in texts for i in tok.encode(s)} | {tok.eot_token})
        self.to_small = {i: j for j, i in enumerate(used)}
        self.to_big = used
        self.eot_token, self.n_vocab = self.to_small[tok.eot_token], len(used)

    def encode(self, s):
        return [self.to_small[i] for i in self.tok.encode(s)]

    def decode(self, ids):
        return self.tok.decode([self.to_big[i] for i in ids])


def train_steps(method, student, teacher, rows, tok, steps=8, lr=3e-3):
    """A few optimizer steps of distill.loss_terms on the same rows; returns the per-step terms."""
    args = distill.get_args(["--task", "sst2", "--method", method])
    args.split_heads = 4
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    ctx = torch.autocast("cpu", enabled=False)
    log = []
    for _ in range(steps):
        loss, terms = distill.loss_terms(student, teacher, distill.encode_rows(rows, tok, args), tok, args, "cpu",
                                         ctx, (1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        log.append(dict(terms, total=loss.item()))
    return log


@pytest.mark.parametrize("method", tasks.METHODS)
def test_few_steps_lower_the_loss(method, data_dir):
    from tokenizer import load_tokenizer
    rows = tasks.load_examples("sst2", "train", data_dir, limit=8)
    tok = SmallVocab(load_tokenizer(os.path.join(data_dir, "tokenizers", "qwen3")),
                     ["".join(tasks.prompt_and_answer("sst2", ex)) for ex in rows])
    teacher = None
    if method == "bitdistill":  # as in the pipeline: an fp16-sft teacher from the same base model
        teacher = tiny_model(seed=0, vocab_size=tok.n_vocab)
        train_steps("fp16-sft", teacher, None, rows, tok)
        teacher.eval().requires_grad_(False)
    student = tiny_model(seed=0, vocab_size=tok.n_vocab)
    if method != "fp16-sft":
        convert_to_bitnet(student, subln=True)
    log = train_steps(method, student, teacher, rows, tok)
    assert log[-1]["total"] < log[0]["total"], (method, log)
    assert set(log[0]) - {"positions"} == ({"ce", "ld", "ad", "total"} if method == "bitdistill" else {"ce", "total"})
    if method == "bitdistill":  # each distillation term goes down on its own too
        assert log[-1]["ld"] < log[0]["ld"] and log[-1]["ad"] < log[0]["ad"], log
    assert not any(torch.is_tensor(v) for v in vars(student.model.layers[1].self_attn).values())  # no state left


def test_clear_errors_teacher_vocab_and_layer():
    student = tiny_model(vocab_size=1000)
    with pytest.raises(ValueError, match="tokenizer"):
        distill.check_same_tokenizer(student, tiny_model(vocab_size=1200), None, None)
    with pytest.raises(ValueError, match="out of range"):
        recipe.layer_index(2, 2, "student")
    with pytest.raises(ValueError, match="out of range"):
        recipe.layer_index(-3, 2, "teacher")
    assert recipe.layer_index(-1, 2, "student") == 1
    assert recipe.teacher_layer_for(1, 2, 4) == 3 and recipe.teacher_layer_for(0, 28, 36) == 0


def test_distill_end_to_end(tmp_path, data_dir, capsys):
    """fp16-sft (the teacher) -> bitdistill with the default teacher path -> resume -> results."""
    base = save_tiny(tmp_path / "tiny.pt", tiny_model())
    out = tmp_path / "out"
    common = ["--task", "sst2", "--batch_size", "4", "--micro_batch_size", "2", "--eval_limit", "4", "--train_limit", "64",
              "--data_dir", data_dir, "--lr", "1e-3"]
    distill.main(common + ["--method", "fp16-sft", "--model", base, "--max_steps", "2",
                           "--out_dir", str(out / "sst2-fp16-sft")])
    with pytest.raises(ValueError, match="out of range"):
        distill.main(common + ["--method", "bitdistill", "--student", base, "--max_steps", "2",
                               "--out_dir", str(out / "sst2-bitdistill"), "--distill_layer", "2"])
    with pytest.raises(ValueError, match="does not divide"):
        distill.main(common + ["--method", "bitdistill", "--student", base, "--max_steps", "2",
                               "--out_dir", str(out / "sst2-bitdistill"), "--split_heads", "3"])
    bd = common + ["--method", "bitdistill", "--student", base, "--max_steps", "3"]
    distill.main(bd + ["--out_dir", str(out / "uninterrupted")])
    straight = capsys.readouterr().out

    def stop_at_step_2(loss, step, ckpt_path):   # an interruption right after step 2's checkpoint
        if step == 2:
            raise KeyboardInterrupt
    real_check = distill.check_finite
    distill.check_finite = stop_at_step_2
    try:
        with pytest.raises(KeyboardInterrupt):
            distill.main(bd + ["--out_dir", str(out / "sst2-bitdistill"), "--save_every", "2"])
    finally:
        distill.check_finite = real_check
    capsys.readouterr()
    distill.main(bd + ["--out_dir", str(out / "sst2-bitdistill"), "--resume"])
    log = capsys.readouterr().out
    assert "steps 2->3" in log and "(resumed)" in log and "step 2/3" not in log
    step3 = lambda text: next(line for line in text.splitlines() if line.startswith("step 3/3")).split(" | ")[1:5]
    assert step3(log) == step3(straight)             # loss, ce, ld, ad identical after resume
    assert "| ld " in log and "| ad " in log
    res = json.load(open(out / "sst2-bitdistill" / "results.json"))
    assert res["n_eval"] == 4 and 0.0 <= res["metrics"]["ACC"] <= 100.0
    student = load_model(str(out / "sst2-bitdistill" / "ckpt.pt"))   # strict load of a 1.58-bit student
    assert student.config.bitnet and student.config.subln
    distill.main(bd + ["--out_dir", str(out / "sst2-bitdistill"), "--eval_only"])                                # same checkpoint, same greedy result
    assert json.load(open(out / "sst2-bitdistill" / "results.json"))["metrics"] == res["metrics"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    """Stage 3's guard, once per step, before the optimizer step: a NaN learning rate at step 2
    makes every weight NaN, step 3's loss is NaN, and the run stops with step 2's checkpoint kept."""
    import training
    base = save_tiny(tmp_path / "tiny.pt", tiny_model())
    real_lr = distill.get_lr
    monkeypatch.setattr(distill, "get_lr", lambda step, *a: float("nan") if step == 2 else real_lr(step, *a))
    out = tmp_path / "nan"
    with pytest.raises(training.NonFiniteLossError) as e:
        distill.main(["--task", "sst2", "--batch_size", "4", "--micro_batch_size", "2", "--train_limit", "64",
                      "--eval_limit", "4", "--data_dir", data_dir, "--method", "bitnet-sft", "--model", base,
                      "--max_steps", "5", "--save_every", "2", "--out_dir", str(out)])
    msg = str(e.value)
    assert "loss is nan at step 3" in msg and f"last good checkpoint is kept at {out / 'ckpt.pt'}" in msg
    assert training.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_chunked_losses_equal_the_whole_batch(form):
    """L_CE and L_LD walked in chunks of 1, 3, 7 and 1000 positions (recomputed in backward) equal one
    pass over the whole batch, in value and in the gradient they send to the student's logits."""
    g = torch.Generator().manual_seed(3)
    B, T, V, tau = 3, 11, 50, 2.0
    s0, t_logits = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    idx, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T)
    mask[0, 8:] = 0
    answer = torch.zeros(B, T)
    answer[:, 5:8] = 1
    results = []
    for chunk in (None, 1000, 1, 3, 7):   # None: this small batch in one pass
        s = s0.clone().requires_grad_()
        ce = losses.ce_loss(s, idx, answer, "token_mean" if form == "authors" else "sample_sum", chunk=chunk)
        ld = losses.logits_distill_loss(s, t_logits, mask if form == "authors" else answer, tau, form, chunk=chunk)
        (ce + ld).backward()
        results.append((ce.detach(), ld.detach(), s.grad))
    for ce, ld, grad in results[1:]:
        torch.testing.assert_close(ce, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ld, results[0][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][2], rtol=1e-5, atol=1e-7)
    assert results[0][2].abs().sum() > 0


