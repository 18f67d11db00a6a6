"""
Stage 3 as a program (its equations are pinned in test_all.py): a few steps of each method on
real SST-2 rows lower the loss, the chunked loss forms equal the whole batch, the clear errors, the
NaN guard, and one end-to-end run of distill.py (train, checkpoint, resume, evaluate, results.json).

    BITDISTILL_DATA=../shared/data python -m pytest -q test_distill.py
"""
import json
import os

import pytest
import torch

import distill
import losses
import recipe
import tasks
from model import Qwen3, Qwen3Config
from subln import convert_to_bitnet
from model import load_checkpoint, load_model

TOKENIZER = os.path.abspath(os.path.join(os.environ.get("BITDISTILL_DATA", ""), "tokenizers", "qwen3"))


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
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
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
