"""
Stage 2's data (paper section 3.2): a general text corpus as a stream of packed token blocks.

Documents are tokenized with the model's tokenizer, each followed by <|endoftext|>, concatenated
and cut into blocks of block_size + 1 tokens (x = block[:-1], y = block[1:]). Two sources:

    offline files    .jsonl (one {"text": ...} per line) or plain text files / folders, e.g.
                     $BITDISTILL_DATA/corpus; the last val_fraction of each file's tokens is held out
    a hub dataset    streamed with `datasets` (the paper's tiiuae/falcon-refinedweb; needs internet);
                     the first val_docs documents are held out

Also the toy LM's text (toy.py): the GLUE tasks' training sentences without labels
(unlabeled_text) and a small byte-level BPE vocabulary trained on the corpus and them (make_tokenizer).

    from corpus import find_files, tokenize_corpus, get_batch
    train, val = tokenize_corpus(find_files(["../shared/data/corpus"]), tok, val_fraction=0.05)
    x, y = get_batch(train, range(8), block_size=128, seed=1, device="cpu")   # (8, 128) each
"""
import glob
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from tokenizer import bos_ids, save_tiktoken, train_bpe
from harness import hub_reason, read_jsonl, write_text
from training import epoch_order

TEXT_EXTS = (".jsonl", ".json", ".txt", ".raw", ".text", ".md")


# ----------------------------------------------------------------------------- offline files

def find_files(paths, data_dir=None):
    """paths (files/folders), else <data_dir>/corpus. A folder contributes its text files."""
    paths = paths or ([os.path.join(data_dir, "corpus")] if data_dir else None)
    if not paths:
        raise ValueError("no training data: pass --data FILES_OR_FOLDERS, set BITDISTILL_DATA (or --data_dir) "
                         "to the offline data folder, or stream with --dataset tiiuae/falcon-refinedweb")
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "*")) if f.endswith(TEXT_EXTS))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p!r} does not exist (--data / --data_dir)")
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_EXTS)}) in {paths}: the corpus is empty")
    return files


def read_documents(path, text_field="text"):
    """A .jsonl/.json file: one document per line (its `text_field`); any other file: one document."""
    if path.endswith((".jsonl", ".json")):
        for n, row in read_jsonl(path):
            if text_field not in row:
                raise ValueError(f"{path}, line {n}: no {text_field!r} field (has {sorted(row)[:6]})")
            yield row[text_field]
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


def document_ids(tok, doc):
    """One document's ids and its end, <|endoftext|> (tok.eot_token); Gemma's also start with <bos>."""
    return bos_ids(tok) + tok.encode_ordinary(doc) + [tok.eot_token]


def tokenize_corpus(files, tok, val_fraction, verbose=False):
    """Every document -> ids + <|endoftext|> (Gemma: <bos> + ids + <eos>); the last val_fraction of each
    file's tokens is held out for validation (so every source is in both splits). Returns (train, val)
    uint32 arrays."""
    train, val = [], []
    for path in files:
        ids = []
        docs = read_documents(path)
        for doc in tqdm(docs, desc=f"tokenizing {os.path.basename(path)}", unit="doc", disable=not verbose):
            if doc.strip():
                ids.extend(document_ids(tok, doc))
        a = np.array(ids, dtype=np.uint32)
        cut = len(a) - int(len(a) * val_fraction)
        train.append(a[:cut])
        val.append(a[cut:])
    return np.concatenate(train), np.concatenate(val)


def get_batch(data, seq_ids, block_size, seed, device):
    """Sequence i of the run is block epoch_order(n, seed, i // n)[i % n] of the packed stream: a
    seeded shuffle, new every epoch, and a pure function of i, so resume and DDP need no data state."""
    n = (len(data) - 1) // block_size
    starts = [int(epoch_order(n, seed, i // n)[i % n]) * block_size for i in seq_ids]
    xy = torch.stack([torch.from_numpy(data[s:s + block_size + 1].astype(np.int64)) for s in starts])
    return xy[:, :-1].to(device), xy[:, 1:].to(device)                          # (B, T), (B, T)


def val_blocks(val, block_size, ids):
    """Validation blocks `ids` (consecutive, not shuffled): (len(ids), block_size + 1) int64."""
    T = block_size
    return torch.stack([torch.from_numpy(val[b * T:b * T + T + 1].astype(np.int64)) for b in ids])


# ----------------------------------------------------------------------------- a hub dataset

def open_stream(name):
    """The real path: the paper's corpus streamed from the hub with `datasets` (needs internet)."""
    try:
        import datasets
        return datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:
        raise ConnectionError(f"could not stream {name!r} ({hub_reason(e)}). "
                              "It needs internet; offline, train on local files with --data / BITDISTILL_DATA, or run the "
                              "whole pipeline at toy scale: python toy.py") from None


def stream_val_tokens(ds, tok, n_docs, text_field):
    """The first n_docs streamed documents, as one uint32 array of ids (each + <|endoftext|>)."""
    return np.array([i for row in ds.take(n_docs) for i in document_ids(tok, row[text_field])], dtype=np.uint32)


def pack_stream(rows, tok, block_size, text_field, docs_done):
    """Documents -> ids + <|endoftext|>, packed into (block_size + 1)-token chunks (consecutive
    chunks share one token, as x/y do). Skips the docs_done documents a resumed run has read.
    Yields (chunk, documents read so far)."""
    buf, T = [], block_size
    for n, row in enumerate(rows.skip(docs_done), docs_done + 1):
        buf += document_ids(tok, row[text_field])
        while len(buf) >= T + 1:
            yield torch.tensor(buf[:T + 1]), n
            buf = buf[T:]


# ----------------------------------------------------------------------------- the toy LM's text (toy.py)

TOY_UNLABELED = ("sst2", "qnli", "mnli")   # whose train split's text (no label) the toy LLM reads


def unlabeled_text(data_dir, out):
    """The GLUE tasks' training sentences, one per line, without their labels: the domain text the
    toy LLM is pretrained on (the paper's Qwen3 has read web text like it). Validation rows never."""
    from tasks import TASKS, load_examples     # toy.py only: stage 2 never loads the task module
    path = os.path.join(out, "unlabeled", "glue_train_text.txt")
    if not os.path.exists(path):
        lines = [ex[f] for task in TOY_UNLABELED for ex in load_examples(task, "train", data_dir)
                 for f in TASKS[task]["fields"]]
        write_text(path, "\n".join(lines) + "\n")
    return path


def make_tokenizer(files, vocab, out):
    """A vocab-token byte-level BPE (tokenizer.train_bpe) on these files, saved as <out>/tokenizer."""
    path = os.path.join(out, "tokenizer", "vocab.tiktoken")
    if not os.path.exists(path):
        texts = []
        for name in files:
            with open(name, encoding="utf-8") as f:
                texts.append("".join(json.loads(l)["text"] + "\n" for l in f) if name.endswith(".jsonl") else f.read())
        t0 = time.time()
        save_tiktoken(train_bpe("\n".join(texts), vocab - 3), os.path.dirname(path))  # + 3 added tokens
        print(f"trained a {vocab}-token BPE vocabulary in {time.time() - t0:.0f} s -> {path}")
    return path
