"""
Qwen2 / Qwen2.5 / Qwen3 tokenizer as a tiktoken.Encoding, built from a checkpoint's own files.

    from tokenizer import load_tokenizer
    tok = load_tokenizer("path/to/Qwen3-0.6B")   # folder with tokenizer.json (+ tokenizer_config.json)
    tok = load_tokenizer("qwen.tiktoken")        # or a rank file; tokenizer_config.json beside it is used
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")   # same ids as Hugging Face's tokenizer
    text = tok.decode(ids)
    tok.eos_token_id, tok.pad_token_id           # Qwen3: 151645 <|im_end|>, 151643 <|endoftext|>; None
                                                 # when no tokenizer_config.json names them

Gemma 3's tokenizer is SentencePiece BPE with byte fallback (merge order by score, "▁" for spaces,
unknown characters as <0xNN> byte tokens): not a tiktoken rank table. Its tokenizer.json is run by
Hugging Face's own `tokenizers` library (SentencePieceBPE below), so its ids are exact by construction;
it adds Gemma's <bos> in front of every prompt (tasks.wrap_prompt) as the checkpoint's
tokenizer_config.json asks (add_bos_token).

Accepted layouts (checked in this order):
    folder/tokenizer.json (or its path)   BPE vocab, NFC normalizer and split regex are read from it
    folder/vocab.json + folder/merges.txt the slow-tokenizer layout; Qwen's regex and NFC are assumed
    file.tiktoken                         `base64(token_bytes) rank` lines (Qwen's own format)
Added tokens (<|endoftext|>, <|im_start|>, ..., </think>) come from tokenizer_config.json's
`added_tokens_decoder` (else tokenizer.json's `added_tokens`, else the Qwen default list below).

How Hugging Face tokenizes, and what this file mirrors step by step:
    1. added tokens are cut out of the raw text (HF does this for every added token, `special` or not)
    2. each remaining piece is NFC-normalized ("e\u0301" -> "\u00e9")
    3. each piece is split with the pre-tokenizer regex (digits one by one, contractions, spaces ...)
    4. each chunk's UTF-8 bytes are merged by byte-level BPE; tiktoken does 3-4 in Rust, with the
       merge priority of a token being its id (we assert the merges list is in id order).
Special-token strings inside text: `encode(text)` splits them out as single ids by default, as HF does.
Pass tiktoken's own arguments for tiktoken's behaviour: `encode(text, allowed_special=set(),
disallowed_special="all")` raises on them, `encode(text, allowed_special=set())` encodes them all as plain
text (safe for untrusted text). HF's `split_special_tokens=True` is in between: only `"special": true`
tokens become plain text, <think>, <tool_call>, ... are still cut out. `encode_ordinary` = NFC, no splitting.
encode_batch (same defaults as encode) and encode_ordinary_batch go through these; encode_to_numpy and
encode_with_unstable are tiktoken's own and skip NFC.
"""
import base64
import collections
import functools
import heapq
import json
import os
import re
import unicodedata

import regex  # tiktoken's own dependency; the same regex dialect as its Rust engine
import tiktoken

# Qwen2Tokenizer's pre-tokenizer regex, the "Split" pattern of Qwen's tokenizer.json.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# SmolLM2 / StarCoder pre-tokenization (llama.cpp's `smollm` pre-tokenizer; Hugging Face's
# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]): every digit is its own piece,
# then GPT-2's regex splits each remaining piece on its own. As one regex for tiktoken: GPT-2's with
# ` ?\p{N}+` -> `\p{N}` (digits alone, no space in front), and `\s+(?!\S)` -> `\s+(?![^\s\p{N}])`
# (a digit ends a piece, so whitespace before it is a run at the end of its piece).
SMOLLM_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# The 26 added tokens of Qwen2/2.5/3 (ids 151643..151668), used for a bare .tiktoken file.
QWEN_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>"]


def byte_to_unicode():
    """GPT-2's byte-level alphabet: vocab files store each byte as a printable character.
    The 188 bytes that are already printable Latin-1 (! .. ~, ¡ .. ¬, ® .. ÿ) stand for themselves;
    the other 68 (control bytes, space, 0x7f-0xa0, soft hyphen) become chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


class Tokenizer(tiktoken.Encoding):
    def __init__(self, name, *, pat_str, mergeable_ranks, special_tokens, nfc=True, eos_token=None, pad_token=None,
                 chat_system=None):
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        self.nfc, self.eos_token, self.pad_token = nfc, eos_token, pad_token
        self.chat_system = chat_system   # the chat template's default system message (None: Qwen's)
        self.eos_token_id = self.encode_single_token(eos_token) if eos_token else None
        self.pad_token_id = self.encode_single_token(pad_token) if pad_token else None
        # bytes with no token of their own (SmolLM2 has none for 21, e.g. \x04; Qwen has all 256)
        self.unknown_bytes = frozenset(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        ascii_unknown = "".join(chr(b) for b in self.unknown_bytes if b < 128)
        self._unknown = re.compile("[" + re.escape(ascii_unknown) + "]") if ascii_unknown else None

    def encode_ordinary(self, text):
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        if self._unknown is not None and self._unknown.search(text):
            # Hugging Face's BPE (no unk token) drops a byte that has no token and merges across it;
            # tiktoken would fail on it: regex pieces, then each piece's known bytes BPE-merged
            ids = []
            for piece in regex.findall(self._pat_str, text):
                known = bytes(b for b in piece.encode("utf-8") if b not in self.unknown_bytes)
                ids += self._encode_single_piece(known) if known else []
            return ids
        return super().encode_ordinary(text)

    def encode(self, text, *, allowed_special="all", disallowed_special=()):
        allowed = frozenset(self.special_tokens_set if allowed_special == "all" else allowed_special)
        disallowed = frozenset(self.special_tokens_set - allowed if disallowed_special == "all" else disallowed_special)
        if disallowed and (m := _alternation(disallowed).search(text)):
            raise ValueError(f"text contains the special token {m.group()!r}; pass allowed_special to encode it "
                             "as one id, or disallowed_special=() to encode it as plain text")
        ids, start = [], 0
        for m in _alternation(allowed).finditer(text) if allowed else []:  # 1. cut out added tokens
            ids += self.encode_ordinary(text[start:m.start()])              # 2.-4. NFC, regex, BPE
            ids.append(self._special_tokens[m.group()])
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_batch(self, text, *, num_threads=8, allowed_special="all", disallowed_special=()):  # encode's defaults
        return super().encode_batch(text, num_threads=num_threads, allowed_special=allowed_special,
                                    disallowed_special=disallowed_special)

    def __getstate__(self):  # so a pickled copy (e.g. in DataLoader workers) keeps our extra settings
        return {**super().__getstate__(), "nfc": self.nfc, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "chat_system": self.chat_system}


@functools.lru_cache
def _alternation(tokens):
    # longest first, so a token that is a prefix of another cannot shadow it (HF matches longest)
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f", line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: not valid JSON ({getattr(e, 'msg', e)}); the file is corrupt, fetch it "
                         "again") from None


def _vocab_to_ranks(vocab, merges, where):
    """vocab {byte-level string: id} and merges [(a, b), ...] -> tiktoken's {bytes: rank}."""
    char_to_byte = {c: b for b, c in byte_to_unicode().items()}
    try:
        ranks = {bytes(char_to_byte[c] for c in token): i for token, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"{where}: token with character {e} is not byte-level BPE (GPT-2 alphabet)") from None
    # tiktoken merges the pair whose result has the lowest id, HF the pair listed first in merges:
    # the same thing only if the merged tokens' ids grow along the merges list. Qwen's do (256, 257, ...).
    merged_ids = [vocab.get(a + b, -1) for a, b in merges]
    if any(x >= y for x, y in zip([-1] + merged_ids, merged_ids)):
        raise ValueError(f"{where}: merges are not in vocab-id order, tiktoken's rank-based BPE would differ")
    return ranks


class SentencePieceBPE:
    """A tokenizer.json that is not byte-level BPE (Gemma's SentencePiece BPE with byte fallback), run
    by the `tokenizers` library, with the interface the rest of this project reads from a Tokenizer:
    encode (added tokens in the text cut out as single ids, as HF does; no <bos>), decode,
    encode_single_token, n_vocab, eot_token (= eos), eos_token_id, pad_token_id, bos_token_id."""
    chat_system = None          # Gemma's chat template has no system turn

    def __init__(self, path, config):
        from tokenizers import Tokenizer as RustTokenizer
        self.name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        self._tk = RustTokenizer.from_file(path)
        self._tk.no_truncation()
        self._tk.no_padding()
        content = lambda t: t["content"] if isinstance(t, dict) else t
        self.eos_token, self.pad_token = content(config.get("eos_token", "<eos>")), content(config.get("pad_token"))
        # the <bos> HF puts first: the first special token of tokenizer.json's post-processor template
        post = _read_json(path).get("post_processor") or {}
        first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
        self.bos_token = first.get("SpecialToken", {}).get("id") if config.get("add_bos_token", True) else None
        self.eos_token_id = self.encode_single_token(self.eos_token)
        self.eot_token = self.eos_token_id                 # ends a plain-text answer, pads a batch
        self.pad_token_id = self.encode_single_token(self.pad_token) if self.pad_token else None
        self.bos_token_id = self.encode_single_token(self.bos_token) if self.bos_token else None
        self.n_vocab = self._tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens_set = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}

    def encode(self, text, *, allowed_special="all", disallowed_special=()):
        if allowed_special != "all" or disallowed_special != ():
            raise ValueError("this tokenizer always cuts added tokens out of the text (allowed_special='all')")
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text):      # added tokens in the text encoded as plain text
        self._tk.encode_special_tokens = True
        try:
            return self._tk.encode(text, add_special_tokens=False).ids
        finally:
            self._tk.encode_special_tokens = False

    def encode_batch(self, texts, **kw):
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def encode_single_token(self, token):
        i = self._tk.token_to_id(token)
        if i is None:
            raise KeyError(token)
        return i


def bos_ids(tok):
    """[<bos>] for a tokenizer whose model expects it first (Gemma), else []."""
    return [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []


def is_sentencepiece_json(path):
    model = _read_json(path).get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _from_tokenizer_json(path):
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model type is {model.get('type')!r}, only byte-level 'BPE' "
                         "(Qwen, GPT-2 style) is supported")
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: BPE options dropout/byte_fallback/subword prefix or suffix are not supported")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{path}: normalizer {normalizer!r} is not supported (only NFC or none)")
    steps = (tj.get("pre_tokenizer") or {}).get("pretokenizers", [])
    if [s["type"] for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        pattern = SMOLLM_PATTERN                               # SmolLM2, StarCoder
    elif [s["type"] for s in steps] != ["Split", "ByteLevel"] or "Regex" not in steps[0]["pattern"] \
            or steps[0].get("invert") or steps[0].get("behavior") != "Isolated" or steps[1].get("use_regex"):
        raise ValueError(f"{path}: pre_tokenizer must be Split(Regex, Isolated) then ByteLevel(use_regex=false), "
                         "as in Qwen's tokenizer.json, or Digits(individual) then ByteLevel, as in SmolLM2's")
    else:
        pattern = steps[0]["pattern"]["Regex"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    # SmolLM2 lists its added tokens in the BPE vocab too (same ids); Qwen does not
    vocab = {t: i for t, i in model["vocab"].items() if added.get(t, {}).get("id") != i}
    return _vocab_to_ranks(vocab, merges, path), pattern, normalizer == "NFC", added


def _from_vocab_merges(folder):
    vocab = _read_json(os.path.join(folder, "vocab.json"))
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n") if line and not line.startswith("#version")]
    return _vocab_to_ranks(vocab, merges, folder), QWEN_PATTERN, True, {}


def _from_tiktoken(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # wrong field count, bad base64 (binascii.Error) or a non-integer rank
                raise ValueError(f"{path}, line {n}: expected 'base64_token rank', got {line[:60]!r}; "
                                 "the rank file is corrupt, fetch it again") from None
    return ranks, QWEN_PATTERN, True, {}


# llama.cpp's `tokenizer.ggml.pre` names of the pre-tokenizers read from a GGUF here (tested on SmolLM2's)
GGUF_PRE = {"smollm": SMOLLM_PATTERN}
CONTROL = 3  # llama.cpp's token type of <|endoftext|>, <|im_start|>, ... (1: a normal BPE token)


def _from_gguf(path):
    """A GGUF file's own tokenizer (tokenizer.ggml.*): byte-level BPE tokens and merges, the
    pre-tokenizer named by `tokenizer.ggml.pre`, control tokens as special tokens, the chat
    template's default system message."""
    from gguf_model import metadata, read_gguf
    r = read_gguf(path)
    get = lambda k, d=None: metadata(r, "tokenizer." + k, d)
    kind, pre = get("ggml.model"), get("ggml.pre")
    if kind != "gpt2" or pre not in GGUF_PRE:
        raise ValueError(f"{path}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported (byte-level BPE "
                         f"'gpt2' with pre-tokenizer {' or '.join(map(repr, GGUF_PRE))} is)")
    tokens, types = get("ggml.tokens"), get("ggml.token_type")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != CONTROL}
    ranks = _vocab_to_ranks(vocab, [m.split(" ") for m in get("ggml.merges")], path)
    name = lambda key: tokens[int(get(key))] if get(key) is not None else None
    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", get("chat_template", "") or "", re.S)
    return Tokenizer(os.path.basename(path), pat_str=GGUF_PRE[pre], mergeable_ranks=ranks, special_tokens=special,
                     nfc=False, eos_token=name("ggml.eos_token_id"), pad_token=name("ggml.padding_token_id"),
                     chat_system=system.group(1) if system else None)


def load_tokenizer(path):
    """A Tokenizer (a tiktoken.Encoding) from a local checkpoint folder, tokenizer.json, .tiktoken
    file, or GGUF file (a path, or a short name of gguf_model.SHORT_NAMES)."""
    from gguf_model import gguf_path, is_gguf
    if is_gguf(path):
        return _from_gguf(gguf_path(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist: pass a local checkpoint folder (with tokenizer.json, "
                                "or vocab.json + merges.txt) or a .tiktoken file")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tokenizer_json = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_json) and is_sentencepiece_json(tokenizer_json):       # Gemma
        config_path = os.path.join(folder, "tokenizer_config.json")
        return SentencePieceBPE(tokenizer_json, _read_json(config_path) if os.path.isfile(config_path) else {})
    if os.path.isfile(tokenizer_json):
        ranks, pattern, nfc, added = _from_tokenizer_json(tokenizer_json)
    elif os.path.isfile(path):
        ranks, pattern, nfc, added = _from_tiktoken(path)
    elif os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
        ranks, pattern, nfc, added = _from_vocab_merges(path)
    else:
        raise FileNotFoundError(f"{path} has no tokenizer files: expected tokenizer.json, or vocab.json and "
                                "merges.txt (the tokenizer part of a Hugging Face checkpoint)")
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    from_config = {t["content"]: {**t, "id": int(i)} for i, t in config.get("added_tokens_decoder", {}).items()}
    if added and from_config and {t: a["id"] for t, a in added.items()} != {t: a["id"] for t, a in from_config.items()}:
        raise ValueError(f"{folder}: tokenizer.json and tokenizer_config.json disagree on the added tokens")
    added = from_config or added or {t: {"id": 151643 + i} for i, t in enumerate(QWEN_ADDED_TOKENS)}
    flagged = [t for t, a in added.items() if any(a.get(k) for k in ("lstrip", "rstrip", "single_word", "normalized"))]
    if flagged:
        raise ValueError(f"{folder}: added tokens {flagged} use lstrip/rstrip/single_word/normalized, not supported")
    special_tokens = {t: a["id"] for t, a in added.items()}
    # Every id 0..n-1 exactly once: catches truncated rank files and clashing added-token ids.
    if sorted([*ranks.values(), *special_tokens.values()]) != list(range(len(ranks) + len(special_tokens))):
        raise ValueError(f"{path}: token ids are not exactly 0..{len(ranks) + len(special_tokens) - 1} "
                         f"({len(ranks)} ranks + {len(special_tokens)} added tokens); the rank file may be truncated "
                         "or the added tokens may not belong to it")
    if any(bytes([b]) not in ranks for b in range(32, 127)):
        raise ValueError(f"{path}: not every printable ASCII byte has a rank, this is not a byte-level BPE vocab")
    content = lambda t: t["content"] if isinstance(t, dict) else t  # configs store "<|x|>" or {"content": ...}
    return Tokenizer(os.path.basename(os.path.normpath(path)), pat_str=pattern, mergeable_ranks=ranks,
                     special_tokens=special_tokens, nfc=nfc,
                     eos_token=content(config.get("eos_token")), pad_token=content(config.get("pad_token")))


# ----------------------------------------------------------------------------- a small vocabulary
# The toy pipeline (toy.py) trains its own small vocabulary: with Qwen's 151,936 rows, the lm_head
# alone would cost a tiny model more than all its layers. Same byte-level BPE, same Qwen regex.

def train_bpe(text, vocab_size, pat_str=QWEN_PATTERN):
    """Byte-level BPE training: tiktoken._educational.bpe_train's algorithm (merge the most frequent
    adjacent pair, again and again), run on the unique regex chunks weighted by their count, and
    re-counting pairs only in the chunks that hold the merged pair. Returns {token bytes: rank}."""
    if vocab_size < 256:
        raise ValueError("vocab_size must be at least 256 (one token per byte)")
    chunks = collections.Counter(regex.findall(pat_str, text))
    words = [[bytes([b]) for b in c.encode("utf-8")] for c in chunks]  # each chunk as a list of tokens
    freq = list(chunks.values())
    ranks = {bytes([i]): i for i in range(256)}
    pair_count, pair_words = collections.Counter(), collections.defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freq[i]
            pair_words[p].add(i)
    heap = [(-n, p) for p, n in pair_count.items()]  # most frequent first, ties broken by the bytes
    heapq.heapify(heap)
    while len(ranks) < vocab_size and heap:
        n, best = heapq.heappop(heap)
        if -n != pair_count.get(best, 0):  # stale entry: the count changed after it was pushed
            continue
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        changed = set()
        for i in pair_words.pop(best):
            w, f = words[i], freq[i]
            for p in zip(w, w[1:]):  # take this chunk's pairs out ...
                pair_count[p] -= f
                changed.add(p)
            out, j = [], 0
            while j < len(w):  # ... merge every occurrence of best ...
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):  # ... and count its new pairs
                pair_count[p] += f
                pair_words[p].add(i)
                changed.add(p)
        pair_count.pop(best, None)
        for p in changed - {best}:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return ranks


def save_tiktoken(ranks, folder, added_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                  eos_token="<|endoftext|>", pad_token="<|endoftext|>"):
    """Writes folder/vocab.tiktoken (Qwen's rank-file format) and a tokenizer_config.json naming the
    added tokens (ids right after the ranks), so that load_tokenizer(folder/vocab.tiktoken) reads it back."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.tiktoken"), "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    decoder = {str(len(ranks) + i): {"content": t, "special": True} for i, t in enumerate(added_tokens)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": decoder, "eos_token": eos_token, "pad_token": pad_token}, f, indent=1)
    return os.path.join(folder, "vocab.tiktoken")


def check_same_tokenizer(student, teacher, s_tok, t_tok):
    """Logits distillation compares distributions over the same vocabulary: the teacher must use
    the student's tokenizer (Qwen3 0.6B/1.7B/4B all do)."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv:
        raise ValueError(f"teacher vocab_size {tv} != student vocab_size {sv}: the teacher must use the "
                         "student's tokenizer (logits distillation compares the same vocabulary)")
    probe = "BitNet Distillation: 1.58-bit students, 你好, émigré!"
    if t_tok is not None and t_tok.encode(probe) != s_tok.encode(probe):
        raise ValueError("the teacher's tokenizer encodes text differently from the student's: "
                         "logits distillation needs one shared tokenizer")
