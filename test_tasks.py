"""
Tests of tasks.py: the offline GLUE / CNN-DM rows, prompt templates (plain and Qwen's chat
template, checked against the official tokenizer), truncation, and the metrics of Tables 1-2.

    BITDISTILL_DATA=../shared/data python -m pytest -q test_tasks.py
"""
import math
import os

import pytest

import tasks


# ----------------------------------------------------------------------------- data and prompts

def test_sst2_offline_rows_and_encoding(data_dir):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(os.path.join(data_dir, "tokenizers", "qwen3"))
    train = tasks.load_examples("sst2", "train", data_dir)
    val = tasks.load_examples("sst2", "validation", data_dir)
    assert len(train) == 67349 and len(val) == 872
    assert val[0] == {"sentence": "it 's a charming and often affecting journey .", "label": 1}
    ids, n_prompt = tasks.encode_example(tok, "sst2", val[0], 512)
    assert tok.decode(ids[:n_prompt]) == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert tok.decode(ids[n_prompt:]) == " positive<|endoftext|>"
    _, mask, answer = tasks.collate([ids, ids[:5] + ids[-2:]], tok.eot_token, [n_prompt, 5])
    assert answer[0].sum() == 2 and answer[1, 5:7].tolist() == [1, 1] and mask[1].sum() == 7
    art = tasks.load_examples("cnndm", "train", data_dir, limit=1)[0]   # ~700-word article, cut to fit
    ids, n_prompt = tasks.encode_example(tok, "cnndm", art, 128)
    assert len(ids) <= 128 and tok.decode(ids[:n_prompt]).endswith("\nSummary:")
    assert tok.decode(ids[n_prompt:]).startswith(" " + art["highlights"][:20])


def test_chat_prompt_ids_equal_the_official_tokenizer(data_dir):
    # recipe item 12: the authors' prompt (LLaMA-Factory's "qwen" template, default system message),
    # built from marker ids and text pieces, equals the whole string run through Qwen3's tokenizer.json
    import tokenizers
    from tokenizer import load_tokenizer
    folder = os.path.join(data_dir, "tokenizers", "qwen3")
    tok, hf = load_tokenizer(folder), tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    chat = tasks.chat_tokens(tok)
    for task in ("sst2", "mnli"):
        ex = tasks.load_examples(task, "validation", data_dir, limit=1)[0]
        ids, n_prompt = tasks.encode_example(tok, task, ex, 512, chat)
        prompt, answer = tasks.prompt_and_answer(task, ex, chat)
        text = (f"<|im_start|>system\n{tasks.QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                f"<|im_start|>assistant\n{answer}<|im_end|>\n")
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids[n_prompt:]) == answer + "<|im_end|>\n" and not answer.startswith(" ")
    assert tasks.stop_token(tok, chat) == tok.encode_single_token("<|im_end|>")
    assert tasks.chat_tokens(object()) is None                               # no such tokens: plain prompts


def test_unknown_task_and_missing_data(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load_examples("cola", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="laid out like"):
        tasks.load_examples("sst2", "train", str(tmp_path))
    import datasets  # a runtime dependency (requirements.txt): missing means fail, not skip

    def offline(*a, **k):   # what load_dataset does without network, minus its 30 s of retries
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="BITDISTILL_DATA"):
        tasks.load_examples("mnli", "validation", None)


def test_heldout_train_rows_never_train(data_dir):
    # few labels + the hyperparameter choice: the last N train rows are held out of training and are
    # what --eval_on heldout scores; the validation rows are untouched by it
    full = tasks.load_examples("qnli", "train", data_dir)
    train, held = tasks.task_splits("qnli", data_dir, train_limit=100, heldout=500, eval_on="heldout")
    assert train == full[:100] and held == full[-500:] and len(full) == 8999
    key = lambda ex: (ex["question"], ex["sentence"])
    train_all, _ = tasks.task_splits("qnli", data_dir, heldout=500)
    assert len(train_all) == 8499 and not {key(e) for e in train_all} & {key(e) for e in held}
    _, val = tasks.task_splits("qnli", data_dir, heldout=500, eval_on="validation", eval_limit=7)
    assert val == tasks.load_examples("qnli", "validation", data_dir)[:7]
    with pytest.raises(ValueError, match="needs --heldout"):
        tasks.task_splits("sst2", data_dir, eval_on="heldout")
    with pytest.raises(ValueError, match="leaves no training rows"):
        tasks.task_splits("qnli", data_dir, heldout=8999)


# ----------------------------------------------------------------------------- metrics

def test_accuracy():
    assert tasks.accuracy([" positive", "negative.", " Positive and more", ""],
                            ["positive", "negative", "positive", "negative"]) == 75.0


def test_summarization_scores_hand_computed():
    # rouge-score's README example, by hand: 6 shared unigrams of 8 (prediction) / 9 (reference);
    # 2 shared bigrams of 7 / 8; LCS "the quick brown jumps the" = 5 tokens.
    ref, pred = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."
    s = tasks.summarization_scores([pred], [ref])
    f = lambda p, r: 200 * p * r / (p + r)
    assert s["ROUGE-1"] == pytest.approx(f(6 / 8, 6 / 9))
    assert s["ROUGE-2"] == pytest.approx(f(2 / 7, 2 / 8))
    assert s["ROUGE-L"] == pytest.approx(f(5 / 8, 5 / 9)) == pytest.approx(s["ROUGE-SUM"])
    # BLEU: every n-gram precision is 1, brevity penalty exp(1 - 5/4)
    assert tasks.summarization_scores(["a b c d"], ["a b c d e"])["BLEU"] == pytest.approx(100 * math.exp(-0.25))
    s = tasks.summarization_scores(["same text here ."], ["same text here ."])
    assert all(v == pytest.approx(100.0) for v in s.values())
