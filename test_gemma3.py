"""
Gemma 3 (Table 3's model, google/gemma-3-1b-pt) in model.py, against transformers' Gemma3ForCausalLM
(the oracle, tests only): tiny random checkpoints with every parameter randomised (norm weights too,
so that (1 + w) against w cannot hide behind an init), a sliding window SHORTER than the sequence,
query_pre_attn_scalar != head_dim, both RoPE bases, left and right padding, greedy decoding past the
window with the KV cache. Each Gemma difference is then broken on purpose and the parity must fail.
"""
import json

import pytest
import torch

import model as model_mod
from model import Qwen3, Qwen3Config
from subln import SubLN, convert_to_bitnet

import transformers  # noqa: E402  (the oracle)

WINDOW = 5            # sequences below are 24 tokens: most keys fall outside a sliding layer's window


def make_gemma(tmp_path, tie=True, n_head=4, n_kv=2, seed=0, hidden=64, layers=4):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=n_head,
        num_key_value_heads=n_kv, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"][:layers],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0)
    hf = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():   # Gemma's norm weights are offsets from 1: around 0
            p.copy_((0.3 if name.endswith("norm.weight") else 0.15) * torch.randn_like(p))
    d = tmp_path / f"gemma3_tie{tie}_{n_head}x{n_kv}_{hidden}x{layers}"
    hf.save_pretrained(d)
    return hf.eval(), str(d)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def padded(rows, side):
    T = max(len(r) for r in rows)
    idx, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[i, sl], mask[i, sl] = r, 1
    return idx, mask


@pytest.mark.parametrize("tie,n_head,n_kv", [(True, 4, 2), (False, 4, 1), (True, 2, 2)])
def test_gemma3_logits_and_greedy_match_transformers(tmp_path, tie, n_head, n_kv):
    hf, path = make_gemma(tmp_path, tie, n_head, n_kv)
    ours = Qwen3.from_pretrained(path).eval()
    c = ours.config
    assert c.gemma and c.layer_types[1] == "full_attention" and c.sliding_window == WINDOW
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 24.0)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, ours(idx)) < 1e-5
    prompt = idx[:1, :8]                          # 20 greedy tokens: the cache runs far past the window
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                      attention_mask=torch.ones_like(prompt))
    assert torch.equal(ref, ours.generate(prompt, max_new_tokens=20))


@pytest.mark.parametrize("side", ["left", "right"])
def test_gemma3_padding_matches_transformers(tmp_path, side):
    hf, path = make_gemma(tmp_path)
    ours = Qwen3.from_pretrained(path).eval()
    rows = [torch.randint(0, 256, (n,)) for n in (24, 13, 4)]
    idx, mask = padded(rows, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)   # transformers takes positions as given; ours come from the mask
    with torch.no_grad():
        ref, got = hf(idx, attention_mask=mask, position_ids=pos).logits, ours(idx, attention_mask=mask)
        real = mask.bool()
        assert rel_err(ref[real], got[real]) < 1e-5
        for i, r in enumerate(rows):            # and each padded row equals the row alone
            sl = slice(idx.shape[1] - len(r), None) if side == "left" else slice(0, len(r))
            assert rel_err(ours(r[None])[0], got[i, sl]) < 1e-5
    if side == "left":                           # batched greedy decoding past the window, row by row
        out = ours.generate(idx, 8, attention_mask=mask)
        for i, r in enumerate(rows):
            assert torch.equal(out[i, idx.shape[1]:], ours.generate(r[None], 8)[0, len(r):])


def test_gemma3_bf16_embedding_scale_and_logits(tmp_path):
    # the embedding is scaled by sqrt(hidden) rounded to the weight's dtype: sqrt(1152) = 33.94 is
    # 34.0 in bf16 (Gemma 3 1B's width); at width 64 (8.0) the two forms would agree, so 1152 it is
    scale = torch.tensor(1152 ** 0.5).to(torch.bfloat16)
    assert scale.item() == 34.0 and torch.tensor(1152 ** 0.5).item() == pytest.approx(33.941, abs=1e-3)
    hf, path = make_gemma(tmp_path, hidden=1152, layers=2)
    hf, ours = hf.to(torch.bfloat16), Qwen3.from_pretrained(path, dtype=torch.bfloat16).eval()
    got = {}
    ours.model.layers[0].register_forward_pre_hook(lambda m, a: got.update(ours=a[0]))
    hf.model.layers[0].register_forward_pre_hook(lambda m, a, kw: got.update(hf=kw.get("hidden_states", a and a[0])),
                                                 with_kwargs=True)
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref, out = hf(idx).logits.float(), ours(idx).float()
    assert torch.equal(got["ours"], got["hf"])   # the scaled embedding, bit for bit in bf16
    assert rel_err(ref, out) < 3e-2


BUGS = {
    "norm_w_not_1_plus_w": lambda m: [setattr(n, "one_plus", False) for n in m.modules()
                                      if isinstance(n, model_mod.RMSNorm)],
    "qwen_block_order": lambda m: [setattr(b, "sandwich", False) for b in m.model.layers],
    "silu_not_gelu": lambda m: [setattr(b.mlp, "gelu", False) for b in m.model.layers],
    "window_ignored": lambda m: setattr(m.config, "sliding_window", 10 ** 6),
    "one_rope_base": lambda m: setattr(m.config, "rope_local_theta", m.config.rope_theta),
    "scale_head_dim": lambda m: [setattr(b.self_attn, "scale", 16 ** -0.5) for b in m.model.layers],
    "window_off_by_one": lambda m: setattr(m.config, "sliding_window", WINDOW + 1),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_gemma3_parity_detects_each_difference(tmp_path, bug):
    hf, path = make_gemma(tmp_path)
    ours = Qwen3.from_pretrained(path).eval()
    BUGS[bug](ours)
    idx = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, ours(idx)) > 1e-3


def test_gemma3_embedding_unscaled_breaks_parity(tmp_path, monkeypatch):
    hf, path = make_gemma(tmp_path)
    ours = Qwen3.from_pretrained(path).eval()
    monkeypatch.setattr(Qwen3Config, "gemma", property(lambda self: False))   # no sqrt(hidden), Qwen norms
    idx = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, ours(idx)) > 1e-3


# the hub's config.json of google/gemma-3-1b-pt (written by transformers 4.50): the older keys
HUB_1B = dict(architectures=["Gemma3ForCausalLM"], attention_bias=False, attn_logit_softcapping=None, bos_token_id=2,
              eos_token_id=1, final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh",
              hidden_size=1152, intermediate_size=6912, max_position_embeddings=32768, model_type="gemma3_text",
              num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1, pad_token_id=0,
              query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000.0, rope_scaling=None,
              rope_theta=1000000.0, sliding_window=512, sliding_window_pattern=6, vocab_size=262144)


def test_gemma3_hub_config_reads_as_transformers_reads_it():
    ours = Qwen3Config.from_hf(json.loads(json.dumps(HUB_1B)))
    ref = transformers.Gemma3TextConfig(**{k: v for k, v in HUB_1B.items() if k != "model_type"})
    assert ours.layer_types == ref.layer_types and ours.layer_types.count("full_attention") == 4   # 6, 12, 18, 24
    assert ours.rope_theta == ref.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert ours.rope_local_theta == ref.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert (ours.sliding_window, ours.query_pre_attn_scalar, ours.head_dim, ours.tie_word_embeddings) == \
        (512, 256.0, 256, True)
    assert Qwen3Config.from_dict(ours.to_dict()) == ours           # our checkpoints store and restore it


@pytest.mark.parametrize("key,value,match", [
    ("final_logit_softcapping", 30.0, "soft-capping"), ("attn_logit_softcapping", 50.0, "soft-capping"),
    ("rope_scaling", {"rope_type": "linear", "factor": 8.0}, "rope scaling"),
    ("hidden_activation", "gelu", "activation"), ("use_bidirectional_attention", True, "bidirectional")])
def test_gemma3_config_refuses_what_it_lacks(key, value, match):
    with pytest.raises(ValueError, match=match):
        Qwen3Config.from_hf(dict(HUB_1B, **{key: value}))


def test_gemma3_subln_before_o_proj_and_down_proj(tmp_path):
    # Eq. (4)-(5) in Gemma's sandwich block: SubLN on the input of o_proj and down_proj; Gemma's own
    # four norms stay where they are (post_attention_layernorm still reads o_proj's output)
    _, path = make_gemma(tmp_path)
    m = convert_to_bitnet(Qwen3.from_pretrained(path), subln=True)
    blk, seen = m.model.layers[0], {}
    assert isinstance(blk.self_attn.subln, SubLN) and isinstance(blk.mlp.subln, SubLN)
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert type(getattr(blk, name)) is model_mod.RMSNorm and getattr(blk, name).one_plus
    blk.self_attn.o_proj.register_forward_hook(lambda mod, i, o: seen.update(o_in=i[0], o_out=o))
    blk.mlp.down_proj.register_forward_hook(lambda mod, i, o: seen.update(d_in=i[0], d_out=o))
    blk.post_attention_layernorm.register_forward_hook(lambda mod, i, o: seen.update(pa_in=i[0]))
    blk.post_feedforward_layernorm.register_forward_hook(lambda mod, i, o: seen.update(pf_in=i[0]))
    with torch.no_grad():
        m(torch.randint(0, 256, (1, 9)))
    for key in ("o_in", "d_in"):
        rms = seen[key].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)     # SubLN weights start at 1
    assert torch.equal(seen["pa_in"], seen["o_out"]) and torch.equal(seen["pf_in"], seen["d_out"])


# ----------------------------------------------------------------------------- Gemma's tokenizer and prompts

@pytest.fixture(scope="module")
def gemma_tok_dir(tmp_path_factory, data_dir):
    """A Gemma-layout tokenizer as transformers' GemmaTokenizer writes it (SentencePiece BPE with byte
    fallback, spaces as '▁', <pad> <eos> <bos> <unk> <mask> at 0-4, the turn markers as added special
    tokens), its merges trained here on SST-2 text: Gemma's own file cannot be downloaded offline."""
    from tokenizers import Tokenizer as RustTokenizer, models, normalizers, pre_tokenizers, trainers
    from test_tokenizer import real_strings
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    tk = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.train_from_iterator(real_strings(data_dir)[:1500], trainers.BpeTrainer(vocab_size=1200, special_tokens=specials))
    model = json.loads(tk.to_str())["model"]
    hf = transformers.GemmaTokenizer(vocab=model["vocab"], merges=[tuple(m) if not isinstance(m, str) else
                                                                   tuple(m.split(" ")) for m in model["merges"]],
                                     add_bos_token=True)
    hf.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    d = tmp_path_factory.mktemp("gemma_tok")
    hf.save_pretrained(d)
    return str(d)


def test_gemma_tokenizer_equals_transformers_on_the_shared_data(gemma_tok_dir, data_dir):
    from test_tokenizer import EDGE_CASES, real_strings
    from tokenizer import SentencePieceBPE, bos_ids, load_tokenizer
    tok, hf = load_tokenizer(gemma_tok_dir), transformers.AutoTokenizer.from_pretrained(gemma_tok_dir)
    assert isinstance(tok, SentencePieceBPE) and json.load(open(f"{gemma_tok_dir}/tokenizer.json"))["model"]["byte_fallback"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.eot_token) == (2, 1, 0, 1)
    strings = real_strings(data_dir) + EDGE_CASES + ["a<start_of_turn>b<end_of_turn>", "\x00 ü 你好 \U0001f600"]
    ours, ref = tok.encode_batch(strings), hf(strings, add_special_tokens=False)["input_ids"]
    assert ours == ref and [tok.encode(s) for s in strings[:50]] == ref[:50]
    assert any(i in range(5, 261) for ids in ours for i in ids)          # byte fallback was exercised
    for s, ids in zip(strings[:300], ours):                             # <bos> in front, as HF adds it
        assert bos_ids(tok) + ids == hf(s)["input_ids"]
        assert tok.decode(ids) == hf.decode(ids)


def test_gemma_chat_prompt(gemma_tok_dir, data_dir):
    # Gemma's turn format (llama.cpp's format_gemma, with the HF template's trim of the message):
    # <bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n, tokenized as one string by HF
    from tokenizer import load_tokenizer
    import tasks
    tok, hf = load_tokenizer(gemma_tok_dir), transformers.AutoTokenizer.from_pretrained(gemma_tok_dir)
    chat = tasks.chat_tokens(tok)
    assert chat == (tok.encode_single_token("<start_of_turn>"), tok.encode_single_token("<end_of_turn>"))
    for ex in tasks.load_examples("sst2", "validation", data_dir)[:40]:
        prompt, answer = tasks.prompt_and_answer("sst2", ex, chat)
        text = f"<start_of_turn>user\n{prompt.strip()}<end_of_turn>\n<start_of_turn>model\n"
        assert tasks.wrap_prompt(tok, prompt, chat) == hf(text)["input_ids"]
        ids, n_prompt = tasks.encode_example(tok, "sst2", ex, 512, chat)
        assert ids == hf(text + answer + "<end_of_turn>\n")["input_ids"] and n_prompt == len(hf(text)["input_ids"])
    # the template trims the message (our task prompts never start or end with whitespace)
    assert tasks.wrap_prompt(tok, " \n hi there \n", chat) == \
        hf("<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n")["input_ids"]


# ----------------------------------------------------------------------------- L_LD over Gemma's 262k vocabulary

def test_logits_losses_never_hold_the_whole_262k_vocabulary(monkeypatch):
    """distill.forward_both with logits whose fp32 copy passes losses.WHOLE_BYTES: the models return
    hidden states, the losses apply lm_head one chunk at a time (model.HeadLogits inside
    losses.chunked_sum's checkpoint). L_CE and L_LD and their gradients equal the whole-logits path,
    and no tensor of forward or backward holds more than one sample's (T, V) logits."""
    from types import SimpleNamespace
    from torch.utils._python_dispatch import TorchDispatchMode
    import distill
    import losses
    V, B, T = 262_144, 4, 80                      # B*T*V*4 bytes = 335 MB > WHOLE_BYTES (256 MB)
    cfg = Qwen3Config.from_hf(dict(HUB_1B, vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=16))
    torch.manual_seed(0)
    student, teacher = Qwen3(cfg), Qwen3(cfg).requires_grad_(False)
    idx = torch.randint(0, V, (B, T))
    mask, answer = torch.ones(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    answer[:, T // 2:] = 1
    args = SimpleNamespace(no_ad=True, no_ld=False, qk_capture="after_rope")
    settings = dict(ce_form="token_mean", ld_form="authors", tau=5.0, lambda_ld=10.0, split_heads=1,
                    ad_temperature=1.0, ad_scaled_dot=True, ad_norm="none", gamma_ad=0.0)

    class Largest(TorchDispatchMode):             # the most elements any op of forward or backward makes
        n = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    Largest.n = max(Largest.n, o.numel())
            return out

    def run():
        student.zero_grad()
        Largest.n = 0
        with Largest():
            s, t = distill.forward_both(student, teacher, idx, None, [1, 1], args, torch.autocast("cpu", enabled=False))
            loss, terms = losses.distill_loss(s, t, idx, mask, answer, **settings)
            loss.backward()
        return loss.item(), terms, [p.grad.clone() for p in student.parameters()], Largest.n

    lazy = run()
    monkeypatch.setattr(distill, "WHOLE_BYTES", 1 << 40)     # the whole (B, T, V) logits, as for a small vocabulary
    monkeypatch.setattr(losses, "WHOLE_BYTES", 1 << 40)
    whole = run()
    assert lazy[3] <= T * V < whole[3] == B * T * V         # one sample's logits at most; the whole path: all
    assert lazy[0] == pytest.approx(whole[0], rel=1e-5) and set(lazy[1]) == {"ce", "ld"}
    for k in lazy[1]:
        assert lazy[1][k].item() == pytest.approx(whole[1][k].item(), rel=1e-5)
    for g_lazy, g_whole in zip(lazy[2], whole[2]):           # fp32 sums in another order: relative to the tensor
        assert rel_err(g_whole, g_lazy) < 1e-4


def test_gemma3_student_refused_by_the_packed_kernels_and_the_export(tmp_path):
    import export
    import packed
    _, path = make_gemma(tmp_path)
    m = convert_to_bitnet(Qwen3.from_pretrained(path), subln=True)
    with pytest.raises(ValueError, match="Gemma 3 student is not packed"):
        packed.PackedQwen3(m.config)
    assert "Gemma 3" in export.refusal(m)
