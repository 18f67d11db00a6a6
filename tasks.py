"""
The downstream tasks of BitNet Distillation (paper section 4.1) as causal-LM fine-tuning: where
each data set lives, its prompt template, its answer text, batching, greedy evaluation and the
metrics of Tables 1-2 (accuracy; BLEU with sacrebleu, ROUGE-1/2/L/Lsum with rouge-score), and
Tables 1-2 of distill.py runs (print_table). distill.py trains on them; the losses and the models
live there, not here; toy.py's tables across seeds live in toy.py.

    from tasks import load_examples, evaluate
    rows = load_examples("sst2", "validation", data_dir="../shared/data")
"""
import csv
import glob
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from bitlinear import BitLinear
from harness import hub_reason, read_jsonl
from tokenizer import bos_ids

# ----------------------------------------------------------------------------------------------
# Tasks: where the data lives, the prompt, the answer.
TASKS = {
    "sst2": dict(kind="cls", hf=("nyu-mll/glue", "sst2"), eval_split="validation",
                 fields=("sentence",), labels=("negative", "positive"),
                 template="Review: {sentence}\nSentiment:"),
    "mnli": dict(kind="cls", hf=("nyu-mll/glue", "mnli"), eval_split="validation_matched",
                 fields=("premise", "hypothesis"), labels=("entailment", "neutral", "contradiction"),
                 template="Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"),
    "qnli": dict(kind="cls", hf=("nyu-mll/glue", "qnli"), eval_split="validation",
                 fields=("question", "sentence"), labels=("yes", "no"),  # 0 entailment, 1 not_entailment
                 template="Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question?"),
    "cnndm": dict(kind="sum", hf=("abisee/cnn_dailymail", "3.0.0"), eval_split="validation",
                  fields=("article",), target="highlights", template="Article: {article}\nSummary:"),
}
METHODS = ("fp16-sft", "bitnet-sft", "bitdistill")


def get_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
    return TASKS[task]


def load_examples(task, split, data_dir=None, limit=None):
    """A list of dicts with the task's fields (+ 'label' or 'highlights'). data_dir: a folder laid
    out like ../shared/data (glue/<task>/<split>.tsv, cnndm/<split>.jsonl); None = Hugging Face hub.
    A malformed file is an error that names the file and line."""
    spec = get_task(task)
    if data_dir is None:
        rows, where = [(i + 1, r) for i, r in enumerate(_load_hub(task, spec, split))], f"{spec['hf'][0]} ({split})"
    else:
        name = ("validation" if split != "train" else "train") + (".tsv" if spec["kind"] == "cls" else ".jsonl")
        where = os.path.join(data_dir, *(("glue", task) if spec["kind"] == "cls" else ("cnndm",)), name)
        if not os.path.exists(where):
            raise FileNotFoundError(f"no {where}: --data_dir must be laid out like ../shared/data")
        rows = _read_tsv(where) if spec["kind"] == "cls" else read_jsonl(where)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"{where} has no rows: nothing to train on or evaluate")
    need = spec["fields"] + (("label",) if spec["kind"] == "cls" else ("highlights",))
    out = []
    for line, row in rows:
        missing = [k for k in need if k not in row]
        if missing:
            raise ValueError(f"{where}, line {line}: no {', '.join(missing)} (has {sorted(row)[:6]})")
        ex = {k: str(row[k]).strip() for k in spec["fields"]}
        if spec["kind"] == "cls":
            label = str(row["label"]).strip()
            if not label.lstrip("-").isdigit() or not 0 <= int(label) < len(spec["labels"]):
                raise ValueError(f"{where}, line {line}: label {label!r} is not one of 0..{len(spec['labels']) - 1} "
                                 "(-1 marks an unlabeled test row: use the train / validation files)")
            ex["label"] = int(label)
        else:
            ex["highlights"] = str(row["highlights"]).strip()
        out.append(ex)
    return out


def task_splits(task, data_dir=None, train_limit=0, heldout=0, eval_on="validation", eval_limit=0):
    """(training rows, evaluation rows). heldout N: the last N rows of the train split never train;
    eval_on "heldout" scores them (to choose hyperparameters), "validation" the validation rows (the
    figures reported). train_limit N: the first N of the remaining training rows (few labels)."""
    train = load_examples(task, "train", data_dir)
    if heldout >= len(train):
        raise ValueError(f"--heldout {heldout} leaves no training rows ({task} train has {len(train)}): lower it")
    held, train = train[len(train) - heldout:], train[:len(train) - heldout]
    if eval_on == "heldout":
        if not heldout:
            raise ValueError("--eval_on heldout needs --heldout N > 0 (the train rows held out to score)")
        evals = held[:eval_limit or None]
    else:
        evals = load_examples(task, "validation", data_dir, eval_limit)
    return train[:train_limit or None], evals


def _read_tsv(path):
    """GLUE TSV (no quoting at all): [(line number, {column: value})]."""
    with open(path, encoding="utf-8", newline="") as f:
        r = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(r, None)
        if not header:
            raise ValueError(f"{path} is empty: expected a header line and tab-separated rows")
        rows = []
        for line in r:
            if len(line) != len(header):
                raise ValueError(f"{path}, line {r.line_num}: {len(line)} tab-separated fields, the header has "
                                 f"{len(header)}")
            rows.append((r.line_num, dict(zip(header, line))))
    return rows


def _load_hub(task, spec, split):
    name, config = spec["hf"]
    split = spec["eval_split"] if split != "train" else "train"
    try:
        import datasets
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:
        raise ConnectionError(f"could not load {name} ({config}, {split}) from the Hugging Face hub "
                              f"({hub_reason(e)}). Offline, pass --data_dir (or set "
                           "BITDISTILL_DATA) to a folder laid out like ../shared/data.") from None


def prompt_and_answer(task, ex, chat=None):
    """The prompt text and the answer text. Plain prompts: the answer follows after a space.
    Chat prompts (chat = chat_tokens(tok)): the answer is the assistant's reply, no space."""
    spec = get_task(task)
    prompt = spec["template"].format(**{k: ex[k] for k in spec["fields"]})
    answer = spec["labels"][ex["label"]] if spec["kind"] == "cls" else ex["highlights"]
    return prompt, (answer if chat else " " + answer)


# Qwen's chat template as the authors' runs use it (LLaMA-Factory template "qwen", its default
# system message): <|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n
# <|im_start|>assistant\n{answer}<|im_end|>\n (SmolLM2: the same ChatML markers, its own system
# message, tokenizer.chat_system). The markers are single ids; the text between them is
# encoded piece by piece, as a tokenizer splits text at special tokens.
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


# Gemma 3's template (its tokenizer_config.json): <bos><start_of_turn>user\n{prompt, trimmed}<end_of_turn>\n
# <start_of_turn>model\n{answer}<end_of_turn>\n; no system turn.
CHAT_MARKERS = (("<|im_start|>", "<|im_end|>"), ("<start_of_turn>", "<end_of_turn>"))


def chat_tokens(tok):
    """The ids of (turn start, turn end) if the tokenizer has Qwen's (ChatML) or Gemma's chat tokens, else None."""
    for start, end in CHAT_MARKERS:
        try:
            return tok.encode_single_token(start), tok.encode_single_token(end)
        except (KeyError, AttributeError):
            continue
    return None




def stop_token(tok, chat):
    """The token that ends an answer: <|im_end|> in chat prompts, <|endoftext|> otherwise."""
    return chat[1] if chat else tok.eot_token


def wrap_prompt(tok, prompt_text, chat):
    if not chat:
        return bos_ids(tok) + tok.encode(prompt_text)
    s, e = chat
    nl = tok.encode("\n")
    if tok.decode([s]) == "<start_of_turn>":                        # Gemma
        return bos_ids(tok) + [s] + tok.encode("user\n" + prompt_text.strip()) + [e] + nl + [s] + tok.encode("model\n")
    system = getattr(tok, "chat_system", None) or QWEN_SYSTEM     # the template's own default (SmolLM2's)
    return ([s] + tok.encode("system\n" + system) + [e] + nl + [s] + tok.encode("user\n" + prompt_text)
            + [e] + nl + [s] + tok.encode("assistant\n"))


def encode_prompt(tok, task, ex, max_tokens, chat=None):
    """Prompt ids, at most max_tokens: the field with the most tokens is cut at its end, again and
    again, until the prompt fits. Every pass shortens a field by at least one token, so this ends:
    with a prompt that fits, or with an error when the template alone is too long."""
    spec = get_task(task)
    ex, field_ids = dict(ex), None
    while True:
        ids = wrap_prompt(tok, prompt_and_answer(task, ex, chat)[0], chat)
        excess = len(ids) - max_tokens
        if excess <= 0:
            return ids
        field_ids = field_ids or {k: tok.encode(ex[k]) for k in spec["fields"]}
        k = max(spec["fields"], key=lambda f: len(field_ids[f]))
        if not field_ids[k]:
            raise ValueError(f"{max_tokens} tokens are left for the {task} prompt, but its template alone takes "
                             f"{len(ids)}: raise --max_len")
        field_ids[k] = field_ids[k][:max(0, len(field_ids[k]) - excess)]
        ex[k] = tok.decode(field_ids[k])


def encode_example(tok, task, ex, max_len, chat=None):
    """Training ids: prompt + answer + its end (<|endoftext|>; in chat prompts <|im_end|> and a newline);
    returns (ids, n_prompt). The answer keeps at most max_len // 2 tokens (CNN/DM highlights);
    the prompt is cut to fit the rest."""
    end = [chat[1]] + tok.encode("\n") if chat else [tok.eot_token]
    answer = tok.encode(prompt_and_answer(task, ex, chat)[1])[:max_len // 2 - len(end)] + end
    prompt = encode_prompt(tok, task, ex, max_len - len(answer), chat)
    return prompt + answer, len(prompt)


def collate(seqs, pad_id, n_prompts=None, left=False):
    """Pad a list of id lists. Returns idx (B, T), attention_mask (B, T) 1 = real, and (if
    n_prompts is given) answer_mask (B, T), 1 on the answer tokens. Right padding for training,
    left padding for generation."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    answer = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        a = T - len(s) if left else 0
        idx[i, a:a + len(s)] = torch.tensor(s)
        mask[i, a:a + len(s)] = 1
        if n_prompts is not None:
            answer[i, a + n_prompts[i]:a + len(s)] = 1
    return idx, mask, answer


# ----------------------------------------------------------------------------------------------
# Metrics (all in percent, as the paper's tables)

def accuracy(preds, labels):
    """Exact match of the generated label word (stripped, lower-cased, first word)."""
    norm = lambda s: (s.strip().split() or [""])[0].strip(".,!").lower()
    return 100.0 * sum(norm(p) == norm(l) for p, l in zip(preds, labels)) / max(len(labels), 1)


def summarization_scores(preds, refs):
    """BLEU (sacrebleu corpus BLEU, default 13a tokenisation) and ROUGE F1 (rouge-score, Porter
    stemmer; rougeLsum splits sentences on newlines, which the CNN/DM highlights use)."""
    import sacrebleu
    from rouge_score import rouge_scorer
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    sums = dict.fromkeys(keys, 0.0)
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)                          # score(target, prediction)
        for k in keys:
            sums[k] += s[k].fmeasure
    out = {"BLEU": sacrebleu.corpus_bleu(preds, [refs]).score}
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-SUM"}
    out.update({names[k]: 100.0 * sums[k] / max(len(preds), 1) for k in keys})
    out["AVG"] = sum(out.values()) / 5                   # Table 2's AVG over the five scores
    return out


@torch.no_grad()
def evaluate(model, tok, task, examples, max_len, gen_len, batch_size, device, ctx, chat=None):
    """Greedy generation on `examples`; returns (metrics dict, generated tokens/s, predictions)."""
    spec = get_task(task)
    stop = stop_token(tok, chat)
    if spec["kind"] == "cls":  # the longest label word + its end token
        gen_len = max(len(tok.encode(("" if chat else " ") + w)) for w in spec["labels"]) + 1
    model.eval()
    preds, n_new, t0 = [], 0, time.time()
    for b in tqdm(range(0, len(examples), batch_size), desc=f"eval {task}", leave=False):
        batch = examples[b:b + batch_size]
        prompts = [encode_prompt(tok, task, ex, max_len - gen_len, chat) for ex in batch]
        idx, mask, _ = collate(prompts, tok.eot_token, left=True)
        with ctx:
            out = model.generate(idx.to(device), gen_len, temperature=0.0, top_p=1.0,
                                 attention_mask=mask.to(device), eos_token_id=stop)
        for row in out[:, idx.shape[1]:].tolist():
            row = row[:row.index(stop)] if stop in row else row
            n_new += len(row)
            preds.append(tok.decode(row))
    speed = n_new / max(time.time() - t0, 1e-9)
    if spec["kind"] == "cls":
        metrics = {"ACC": accuracy(preds, [spec["labels"][ex["label"]] for ex in examples])}
    else:
        metrics = summarization_scores([p.strip() for p in preds], [ex["highlights"] for ex in examples])
    return metrics, speed, preds


def weight_memory_gb(model):
    """Weights as deployed: BitLinear weights at 2 bits (packed ternary), everything else
    (embeddings, lm_head, norms; full precision, as subln.py keeps them) at 16 bits."""
    ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    total = sum(p.numel() for p in model.parameters())
    return (ternary * 2 / 8 + (total - ternary) * 2) / 1e9


def collect_results(paths):
    """The results.json of the runs the user names: a run folder, a results.json, or an experiment
    folder whose sub-folders are runs. A file that is not one run's results is skipped with a warning."""
    files = []
    for p in paths:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isfile(os.path.join(p, "results.json")):
            files.append(os.path.join(p, "results.json"))
        else:
            files += sorted(glob.glob(os.path.join(p, "**", "results.json"), recursive=True))
    results = []
    for f in files:
        try:
            with open(f) as fh:
                r = json.load(fh)
            assert isinstance(r, dict) and r["task"] in TASKS and r["method"] in METHODS and isinstance(r["metrics"], dict)
            results.append(r)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            print(f"warning: skipped {f}: not the results.json of one distill.py run ({type(e).__name__})",
                  file=sys.stderr)
    if not results:
        raise FileNotFoundError(f"no distill.py results.json under {', '.join(paths)}")
    return results


def print_table(results):
    """Tables 1-2 layout of a list of results.json dicts (one row per label)."""
    results = sorted(results, key=lambda r: (METHODS.index(r["method"]), r["label"]))
    rows = list(dict.fromkeys(r["label"] for r in results))
    cls = [r for r in results if TASKS[r["task"]]["kind"] == "cls"]
    if cls:
        print("\nTable 1 layout (accuracy, %) | Speed = greedy eval tokens/s of this PyTorch run (fake-quantized"
              " BitLinear, not the packed kernel) | Memory = weights, ternary at 2 bits, rest 16-bit")
        print(f"{'Method':<28}{'MNLI':>8}{'QNLI':>8}{'SST2':>8}{'Speed (tokens/s)':>19}{'Memory (G)':>12}")
        for label in rows:
            got = {r["task"]: r for r in cls if r["label"] == label}
            if got:
                any_r = next(iter(got.values()))
                accs = "".join(f"{got[t]['metrics']['ACC']:>8.2f}" if t in got else f"{'-':>8}"
                               for t in ("mnli", "qnli", "sst2"))
                print(f"{label:<28}{accs}{any_r['speed']:>19.1f}{any_r['memory_gb']:>12.4f}")
    summ = [r for r in results if r["task"] == "cnndm"]
    if summ:
        cols = ("BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-SUM", "AVG")
        print("\nTable 2 layout (CNN/DM)")
        print(f"{'Method':<28}" + "".join(f"{c:>10}" for c in cols) + f"{'Speed':>10}{'Memory (G)':>12}")
        for r in summ:
            print(f"{r['label']:<28}" + "".join(f"{r['metrics'][c]:>10.2f}" for c in cols)
                  + f"{r['speed']:>10.1f}{r['memory_gb']:>12.4f}")
