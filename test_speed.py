"""
Tests of training speed (profiling.py, docs/speed.md): the fused quantizers
equal the reference forms of Eq. (1)-(3), compiled training equals eager with a bounded number of
graphs, right-padded stage-3 batches run causal-only with the masked forward's losses, one
weight quantization per optimizer step, the model FLOPs, and the --profile reports.

    BITDISTILL_DATA=../shared/data python -m pytest -q test_speed.py
"""
import json
import os

import pytest
import torch

import continue_train as ct
import distill
from bitlinear import (BitLinear, activation_quant, activation_quant_fused, activation_quant_int, weight_quant,
                       weight_quant_fused, weight_quant_int)
from losses import distill_loss
from test_distill import save_tiny, tiny_model
from test_train import losses, run
import training
from model import load_model


# ----------------------------------------------------------------------------- Eq. (1)-(3), fused

def quant_inputs(dtype):
    """Rows that stress Eq. (1)-(3): random scales, all-zero, one huge value, exact .5 ties of
    127/γ·x, negative maxima; shapes with odd widths and leading batch dims."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 7, 33, generator=g) * torch.rand(4, 7, 1, generator=g) * 10,
          torch.randn(5, 1000, generator=g), torch.zeros(2, 16), torch.tensor([[1e6, 1.0, -3.0]]),
          torch.tensor([[127.0, 0.5, 1.5, -2.5, 63.5], [-127.0, -0.5, 3.5, 0.0, 64.5]]) / 127]
    return [x.to(dtype) for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantizers_equal_the_references(dtype, monkeypatch):
    """The fused forms of Eq. (1)-(3) (fewer passes over memory, no autograd graph; what
    weight_quant / activation_quant run with bitlinear.FUSED) give the reference lines' values (FUSED
    off) bit for bit, eager and (Eq. 3) under torch.compile, in fp32 and bf16.
    Compiled Eq. (1)-(2) sums mean|W| in another order: Δ may differ in the last bit, the codes not."""
    import bitlinear
    compiled_a, compiled_w = torch.compile(activation_quant_fused), torch.compile(weight_quant_fused)
    for x in quant_inputs(dtype):
        monkeypatch.setattr(bitlinear, "FUSED", False)
        ref_a, ref_w = activation_quant(x), weight_quant(x)
        xg = x.detach().requires_grad_()                 # the reference lines ran: they build a graph
        assert weight_quant(xg).requires_grad and activation_quant(xg).requires_grad
        monkeypatch.setattr(bitlinear, "FUSED", True)
        got_a, got_w = activation_quant_fused(x), weight_quant_fused(x)
        assert got_a.dtype == got_w.dtype == dtype
        assert torch.equal(got_a, ref_a) and torch.equal(got_w, ref_w)
        got_a, got_w = compiled_a(x), compiled_w(x)
        assert got_a.dtype == got_w.dtype == dtype and torch.equal(got_a, ref_a)
        assert torch.equal(got_w.sign(), ref_w.sign()) and torch.allclose(got_w, ref_w, rtol=2e-7 if dtype == torch.float32 else 0, atol=0)
    x = torch.randn(3, 8, requires_grad=True)
    assert not activation_quant_fused(x).requires_grad and not weight_quant_fused(x).requires_grad


def test_bf16_fake_quant_has_the_integer_codes():
    """Eq. (3) in fp32 arithmetic whatever the input dtype: a bf16 activation de-quantizes to the
    int8 codes and γ that packed inference computes (bf16 arithmetic would round 127/γ·x to a
    multiple of 0.5 above 64 and train on other codes)."""
    for x in quant_inputs(torch.bfloat16):
        q, gamma = activation_quant_int(x)
        assert torch.equal(activation_quant(x), (gamma / 127.0 * q.float()).to(torch.bfloat16))
        codes, delta = weight_quant_int(x)
        assert torch.equal(weight_quant(x), (delta * codes.float()).to(torch.bfloat16))


def test_compiled_bitlinear_equals_eager():
    """A BitLinear under torch.compile (the quantizers fused into its kernels) gives eager's
    output and gradients."""
    torch.manual_seed(0)
    bl = BitLinear(48, 24)
    x = torch.randn(2, 5, 48)
    outs = []
    for f in (bl, torch.compile(bl)):
        bl.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, bl.weight.grad, bl.bias.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- stage 2

def test_weight_quantized_once_per_optimizer_step(monkeypatch):
    """bitlinear.weight_quant_once: inside one optimizer step each BitLinear quantizes its weight
    once (not once per micro-batch), with losses and gradients identical bit for bit to quantizing
    every time; after optimizer.step() the next step quantizes the updated weights."""
    import bitlinear
    from model import Qwen3, Qwen3Config
    from subln import convert_to_bitnet
    cfg = lambda: Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,  # noqa: E731
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    calls = []
    real = bitlinear.weight_quant_fused
    monkeypatch.setattr(bitlinear, "weight_quant_fused", lambda w, eps: calls.append(1) or real(w, eps))
    runs = []
    for once in (False, True):
        torch.manual_seed(0)
        model = convert_to_bitnet(Qwen3(cfg()))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.randint(0, 97, (2, 3, 2, 9), generator=torch.Generator().manual_seed(1))  # (steps, micro, B, T)
        losses_, grads = [], []
        for step in range(2):
            calls.clear()
            with bitlinear.weight_quant_once(model, once):
                for micro in range(3):
                    loss = model(data[step, micro]).float().logsumexp(-1).mean() / 3
                    loss.backward()
                    losses_.append(loss.item())
            n_linear = sum(isinstance(m, bitlinear.BitLinear) for m in model.modules())
            assert len(calls) == (n_linear if once else 3 * n_linear)
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        runs.append((losses_, grads))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_compiled_training_matches_eager(tmp_path, data_dir, byte_tok, tiny_hf):
    """--compile on the CPU: the same losses and validation losses as eager (to float rounding), and
    one compiled graph for the whole run (training; evaluation runs eagerly), so no evaluation
    ever compiles."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    args = ("--tokens", "256", "--eval_interval", "2")
    _, eager = run(tmp_path, data_dir, byte_tok, tiny_hf, *args, name="eager")
    _, comp = run(tmp_path, data_dir, byte_tok, tiny_hf, *args, "--compile", name="compiled")
    assert losses(comp) == pytest.approx(losses(eager), rel=1e-4)
    assert [r["loss"] for r in comp["val"]] == pytest.approx([r["loss"] for r in eager["val"]], rel=1e-4)
    assert len(comp["val"]) == 3 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_profile_times_the_step_and_writes_nothing(tmp_path, data_dir, byte_tok, tiny_hf, capsys):
    """--profile N: one warm-up + N optimizer steps, the split into data / forward / backward /
    optimizer, peak memory and MFU printed (and as a PROFILE json line); no output folder written."""
    out = tmp_path / "prof"
    ct.main(["--init", tiny_hf, "--tokenizer", byte_tok, "--data", os.path.join(data_dir, "corpus", "tinyshakespeare.txt"),
             "--block_size", "32", "--batch_size", "2", "--grad_accum", "2", "--profile", "3", "--out_dir", str(out)])
    res = json.loads(next(l for l in capsys.readouterr().out.splitlines() if l.startswith("PROFILE "))[8:])
    assert res["steps"] == 3 and res["tokens_per_step"] == 2 * 2 * 32
    assert all(res["step_ms"][p] > 0 for p in ("data", "forward", "backward", "optimizer"))
    mean = sum(res["step_ms"].values())               # the 3 steps' totals: median and slowest among them
    assert 0 < res["median_step_ms"] <= res["slowest_step_ms"] <= 3 * mean and res["slowest_step_ms"] >= mean
    assert 0 < res["mfu"] < 1 and res["peak_memory_gb"] > 0 and res["measured_peak_tflops"] > 0
    assert not out.exists()


def test_model_flops_equal_pytorch_flop_counter(tiny_hf):
    """profiling's model FLOPs (6N + 12 L T d_attn per token) against PyTorch's own count of one
    forward + backward: the linears of the 1.58-bit model exactly (FlopCounterMode does not count
    the CPU's fused attention kernel), attention through its two matmuls written out."""
    from torch.utils.flop_counter import FlopCounterMode
    import profiling
    from subln import convert_to_bitnet
    model = convert_to_bitnet(load_model(tiny_hf))
    c, (B, T) = model.config, (2, 48)
    with FlopCounterMode(display=False) as fc:
        model(torch.randint(0, c.vocab_size, (B, T))).float().sum().backward()
    assert fc.get_total_flops() == 3 * B * T * profiling.linear_flops_per_token(c)
    q, k, v = (torch.randn(B, c.num_attention_heads, T, c.head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).sum().backward()
    assert fc.get_total_flops() * c.num_hidden_layers == 3 * B * T * profiling.attention_flops_per_token(c, T)
    assert profiling.training_flops_per_token(c, T) == 3 * profiling.matmul_flops_per_token(c, T)


def test_quantizer_profile_script(capsys):
    """python profiling.py: every row timed (the quantizers in copies of their input, BitLinear
    against nn.Linear eager and compiled), the printed ratios are those of the printed times."""
    import profiling
    profiling.main(["--tokens", "64", "--d_in", "32", "--d_out", "16", "--reps", "1"])
    out = capsys.readouterr().out
    res = json.loads(next(l for l in out.splitlines() if l.startswith("QUANTPROFILE "))[13:])
    ms = res["ms"]
    assert res["tokens"] == 64 and all(v > 0 for v in ms.values()) and len(ms) == 11
    assert f"BitLinear / nn.Linear: {ms['BitLinear fwd+bwd'] / ms['nn.Linear fwd+bwd']:.2f}x" in out
    assert f"{ms['Eq. 3 + STE, fused'] / ms['copy of X']:5.2f} copies" in out
    with pytest.raises(SystemExit):
        profiling.main(["--tokens", "0"])


# ----------------------------------------------------------------------------- stage 3

def test_right_padded_batches_run_causal_only(data_dir, monkeypatch):
    """Stage 3's right-padded batches reach the models with no attention mask (SDPA's fused causal
    path): every loss term and the student's gradients equal those of the masked forward, since no
    real position sees a pad under causal attention."""
    import tasks
    from subln import convert_to_bitnet
    from test_distill import TOKENIZER, SmallVocab
    from tokenizer import load_tokenizer
    rows = tasks.load_examples("sst2", "train", data_dir, limit=6)
    tok = SmallVocab(load_tokenizer(TOKENIZER), ["".join(tasks.prompt_and_answer("sst2", ex)) for ex in rows])
    teacher = tiny_model(seed=1, vocab_size=tok.n_vocab).eval().requires_grad_(False)
    student = convert_to_bitnet(tiny_model(seed=0, vocab_size=tok.n_vocab), subln=True)
    args = distill.get_args(["--task", "sst2", "--method", "bitdistill", "--split_heads", "4"])
    ctx, seen, real = torch.autocast("cpu", enabled=False), [], distill.forward_both
    monkeypatch.setattr(distill, "forward_both", lambda m, t, idx, mask, *a: seen.append(mask) or real(m, t, idx, mask, *a))
    loss, terms = distill.loss_terms(student, teacher, distill.encode_rows(rows, tok, args), tok, args, "cpu", ctx, (1, 1))
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    assert seen == [None]                                      # ran without the mask
    student.zero_grad(set_to_none=True)                        # the reference: the same batch, masked
    chat = None
    seqs, n_prompts = zip(*[tasks.encode_example(tok, "sst2", ex, args.max_len, chat) for ex in rows])
    idx, mask, answer = tasks.collate(seqs, tok.eot_token, n_prompts)
    assert mask.min() == 0                                     # the batch is padded
    s, t = real(student, teacher, idx, mask, (1, 1), args, ctx)
    ref_loss, ref = distill_loss(s, t, idx, mask, answer, **distill.loss_settings(args))
    ref_loss.backward()
    for k in ("ce", "ld", "ad"):
        assert float(terms[k]) == pytest.approx(float(ref[k]), rel=1e-5, abs=1e-9), k
    for g, r in zip(grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_compiled_bitdistill_matches_eager(tmp_path, data_dir, capsys):
    """distill.py --compile on the CPU: BitDistill's losses (ce, ld, ad) equal eager's (to the
    rounding printed, and what the quantizers make of rounding), over batches padded to different
    lengths, with three compiled graphs for the whole run: the student's first micro-batch of a step
    (it quantizes the weights, bitlinear.weight_quant_once) and its later ones (they reuse them), and
    the teacher's forward; T is marked dynamic, so no graph per length; evaluation is eager."""
    import torch._dynamo
    base = save_tiny(tmp_path / "tiny.pt", tiny_model())
    common = ["--task", "sst2", "--batch_size", "4", "--micro_batch_size", "2", "--train_limit", "64", "--eval_limit", "2",
              "--data_dir", data_dir, "--method", "bitdistill", "--student", base, "--teacher", base, "--max_steps", "3"]
    logs = []
    for flag in ("--no_compile", "--compile"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        distill.main(common + [flag, "--out_dir", str(tmp_path / flag)])
        lines = [l.split(" | ")[1:5] for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
        logs.append([float(part.split()[-1]) for line in lines for part in line])   # loss, ce, ld, ad per step
        assert (tmp_path / flag / "results.json").exists()
    graphs, _ = torch._dynamo.utils.counters["stats"]["unique_graphs"], torch._dynamo.reset()
    # the 1.58-bit student quantizes its activations: a last-bit difference may move one int8 code,
    # and Adam's first steps (updates of ±lr whatever the gradient's size) then carry it further
    assert len(logs[0]) == 3 * 4 and logs[1][:4] == pytest.approx(logs[0][:4], rel=1e-3)
    assert logs[1] == pytest.approx(logs[0], rel=2e-2)
    assert graphs == 3


def test_profile_bitdistill_writes_nothing(tmp_path, data_dir, capsys):
    """distill.py --profile N with a teacher: the split, peak memory and MFU whose model FLOPs count the
    student's forward + backward and the teacher's forward over the positions actually processed;
    no output folder, no checkpoint, no evaluation."""
    import profiling
    base = save_tiny(tmp_path / "tiny.pt", tiny_model())
    distill.main(["--task", "sst2", "--batch_size", "4", "--micro_batch_size", "2", "--train_limit", "64",
                  "--data_dir", data_dir, "--method", "bitdistill", "--student", base, "--teacher", base,
                  "--profile", "2", "--out_dir", str(tmp_path / "prof")])
    out = capsys.readouterr().out
    res = json.loads(next(l for l in out.splitlines() if l.startswith("PROFILE "))[8:])
    assert res["steps"] == 2 and res["step_ms"]["forward"] > 0 and res["step_ms"]["backward"] > 0
    assert 0 < res["mfu"] < 1 and not (tmp_path / "prof").exists() and "accuracy" not in out
    # 3 x the student's forward + 1 x the teacher's (the same model here) = 4 (a + b T) per position,
    # a = linears, b T = attention: the mean T it implies must be a real padded length (3x would not be)
    c = tiny_model().config
    a, b = profiling.linear_flops_per_token(c), profiling.attention_flops_per_token(c, 1)
    t_mean = (res["model_flops_per_token"] / 4 - a) / b
    assert 4 <= t_mean <= 512, t_mean


def test_compile_default_is_on_for_cuda_only():
    """--compile / --no_compile / neither: neither means on for a CUDA device, off on the CPU."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [training.use_compile(ct.parse_args(a).compile, d) for a in ([], ["--compile"], ["--no_compile"])
            for d in (cpu, cuda)] == [False, True, True, True, False, False]
    assert distill.get_args(["--task", "sst2"]).compile is None
