"""
Bad input and faults, as a careful user meets them: every case runs a script as a subprocess on the
toy's smoke checkpoints and must exit non-zero with one `error:` line naming the problem, no
Python traceback, and every checkpoint and results file of earlier runs unchanged, byte for byte.
At the end: the loaders' own errors, and the file layout the README describes.

    BITDISTILL_DATA=../shared/data python -m pytest -q test_errors.py
"""
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import toy
import harness
from model import Qwen3, Qwen3Config, load_checkpoint, load_model
from test_all import make_hf

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    """The toy's smoke pipeline (Table 1 rows): pretrain, stage 2, FP16-SFT, BitNet-SFT, BitDistill."""
    out = tmp_path_factory.mktemp("smoke") / "toy"
    toy.main(["--preset", "smoke", "--out", str(out), "--data_dir", data_dir])
    runs = out / "authors" / "sst2" / "seed1"
    return dict(out=str(out), pre=str(out / "pretrain" / "ckpt.pt"), ct=str(out / "authors" / "ct"),
                ft=str(runs / "fp16sft"), bd=str(runs / "bitdistill"), tok=str(out / "tokenizer" / "vocab.tiktoken"))


def digests(folder):
    """Every checkpoint and results file under folder -> its sha256: what no failed run may touch."""
    files = [f for ext in ("*.pt", "*.json", "*.csv") for f in glob.glob(os.path.join(folder, "**", ext), recursive=True)]
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def run(script, *args, env=None, cwd=HERE, workdir=None):
    return subprocess.run([sys.executable, os.path.join(cwd, script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=workdir or cwd, env={**os.environ, **(env or {})})


def assert_one_error_line(p, pattern):
    import re
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, p.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]


def tsv(folder, task, train, validation):
    """A data folder laid out like ../shared/data with these GLUE train / validation texts."""
    d = os.path.join(folder, "glue", task)
    os.makedirs(d, exist_ok=True)
    for name, text in (("train", train), ("validation", validation)):
        with open(os.path.join(d, f"{name}.tsv"), "w") as f:
            f.write(text)


SST2_HEADER = "sentence\tlabel\n"
GOOD_ROWS = "".join(f"a fine film number {i}\t{i % 2}\n" for i in range(8))
DATA = {"d1": (SST2_HEADER + GOOD_ROWS, SST2_HEADER),                                   # no validation rows
        "d2": (SST2_HEADER + GOOD_ROWS + "unlabeled\t-1\n", SST2_HEADER + GOOD_ROWS),   # a test-split label
        "d3": ("", ""),                                                                # empty files
        "d4": (SST2_HEADER, SST2_HEADER + GOOD_ROWS),                                   # header only
        "d5": (SST2_HEADER + "no tab here\n", SST2_HEADER + GOOD_ROWS)}                  # a row without a tab


def swap(cmd, flag, value):
    """cmd with the value after `flag` replaced."""
    i = cmd.index(flag)
    return cmd[:i + 1] + [value] + cmd[i + 2:]


def cases(s, tmp):
    """(id, script, args..., pattern of the error line). s: the smoke paths; tmp: a scratch folder."""
    tmp = str(tmp)
    x = ["--out_dir", f"{tmp}/x"]
    ft = ["distill.py", "--task", "sst2", "--method", "fp16-sft", "--model", s["pre"], "--max_steps", "1",
          "--batch_size", "2", "--micro_batch_size", "2", "--eval_limit", "2", "--max_len", "64"]
    ct = ["continue_train.py", "--init", s["pre"], "--tokens", "256", "--block_size", "32", "--batch_size", "2"]
    bd = ["distill.py", "--task", "sst2", "--method", "bitdistill", "--out_dir", s["bd"], "--resume", "--max_steps", "2",
          "--batch_size", "4", "--micro_batch_size", "4", "--max_len", "64", "--seed", "1", "--lr", "1e-3",
          "--prompt", "plain", "--eval_limit", "8", "--train_limit", "16", "--heldout", "8"]   # as the toy's smoke ran it
    data = lambda d: ["--data_dir", f"{tmp}/{d}"]
    model = lambda name: swap(ft, "--model", os.path.join(tmp, name)) + x
    return [
        # work silently lost
        ("rerun-distill", *ft, "--out_dir", s["ft"], r"already holds ckpt.pt, results.json .* --resume.* --overwrite"),
        ("rerun-ct", *ct, "--out_dir", s["ct"], r"already holds ckpt.pt, metrics.json"),
        ("unwritable-out", *ft, "--out_dir", os.path.join(s["pre"], "sub"), r"cannot write to --out_dir"),
        # results that did not happen
        ("max-steps-negative", *swap(ft, "--max_steps", "-1"), *x, r"--max_steps: must be 0 or more"),
        ("epochs-zero", *ft, "--epochs", "0", *x, r"--epochs: must be a positive number"),
        ("empty-validation", *ft, *x, *data("d1"), r"validation.tsv has no rows"),
        ("label-minus-one", *ft, *x, *data("d2"), r"train.tsv, line 10: label '-1' is not one of 0..1"),
        ("resume-other-method", *swap(bd, "--method", "bitnet-sft"), r"--method is 'bitnet-sft' but .* used 'bitdistill'"),
        ("resume-other-task", *swap(bd, "--task", "mnli"), r"--task is 'mnli' but .* used 'sst2'"),
        ("resume-fewer-steps", *swap(bd, "--max_steps", "1"), r"--max_steps is 1 but .* used 2: resume with --max_steps 2 or more"),
        ("resume-other-batch", *swap(bd, "--batch_size", "8"), r"--batch_size is 8 but .* used 4"),
        ("resume-other-seed", *swap(bd, "--seed", "2"), r"--seed is 2 but .* used 1"),
        ("resume-other-heldout", *swap(bd, "--heldout", "4"), r"--heldout is 4 but .* used 8"),
        ("resume-ct-other-block", *swap(swap(ct, "--tokens", "1024"), "--batch_size", "8"), "--out_dir", s["ct"], "--resume",
         "--block_size", "16", "--lr", "1e-3", "--seed", "1", r"--block_size is 16 but .* used 32"),
        ("eval-iters-zero", *ct, "--eval_iters", "0", *x, r"--eval_iters: must be a positive integer"),
        ("lr-zero", *ft, "--lr", "0", *x, r"--lr: must be a positive number"),
        ("heldout-everything", *ft, "--heldout", "67349", *x, r"--heldout 67349 leaves no training rows .* lower it"),
        ("eval-on-heldout-without-rows", *ft, "--eval_on", "heldout", *x, r"--eval_on heldout needs --heldout N > 0"),
        # one line where a traceback was
        ("truncated-pt", *model("trunc.pt"), r"trunc.pt is not a readable checkpoint"),
        ("empty-pt", *model("empty.pt"), r"empty.pt is not a readable checkpoint"),
        ("alien-pt", *model("alien.pt"), r"alien.pt is not a bitdistill checkpoint"),
        ("empty-config", *model("noconf.pt"), r"incomplete 'config'"),
        ("missing-pt", *model("nowhere/ckpt.pt"), r"no checkpoint at"),
        ("eval-only-truncated", "distill.py", "--task", "sst2", "--eval_only", "--out_dir", f"{tmp}/evaltrunc",
         r"ckpt.pt is not a readable checkpoint"),
        ("packed-load-training-ckpt", "packed.py", "--load", s["pre"], r"is a training checkpoint, not a packed model: use --ckpt"),
        ("packed-ckpt-empty", "packed.py", "--ckpt", f"{tmp}/empty.pt", r"empty.pt is not a readable checkpoint"),
        ("bad-tokenizer-json", *ft, "--tokenizer", f"{tmp}/badtok", *x, r"tokenizer.json, line 1: not valid JSON"),
        ("bad-corpus-jsonl", *ct, "--tokenizer", s["tok"], "--data", f"{tmp}/bad.jsonl", *x, r"bad.jsonl, line 2: not JSON"),
        ("empty-task-file", *ft, *x, *data("d3"), r"(train|validation).tsv is empty"),
        ("header-only-train", *ft, *x, *data("d4"), r"train.tsv has no rows"),
        ("row-without-tab", *ft, *x, *data("d5"), r"train.tsv, line 2: 1 tab-separated fields, the header has 2"),
        ("cnndm-no-highlights", *swap(ft, "--task", "cnndm"), *x, *data("d6"), r"(train|validation).jsonl, line 1: no highlights"),
        ("batch-size-zero", *swap(ft, "--batch_size", "0"), *x, r"--batch_size: must be a positive integer"),
        ("micro-batch-zero", *swap(ft, "--micro_batch_size", "0"), *x, r"--micro_batch_size: must be"),
        ("grad-accum-zero", *ct, "--grad_accum", "0", *x, r"--grad_accum: must be a positive integer"),
        ("block-size-zero", *swap(ct, "--block_size", "0"), *x, r"--block_size: must be a positive integer"),
        ("eval-interval-zero", *ct, "--eval_interval", "0", *x, r"--eval_interval: must be"),
        ("eval-batch-zero", *ft, "--eval_batch_size", "0", *x, r"--eval_batch_size: must be"),
        ("max-len-zero", *swap(ft, "--max_len", "0"), *x, r"--max_len: must be a positive integer"),
        ("max-new-tokens-negative", "packed.py", "--ckpt", s["bd"] + "/ckpt.pt", "--max_new_tokens", "-1",
         r"--max_new_tokens: must be 0 or more"),
        ("empty-prompt", "packed.py", "--ckpt", s["bd"] + "/ckpt.pt", "--prompt", " ", r"--prompt is empty"),
        # security: a crafted .pt is refused, and its payload never runs (checked in the test)
        ("crafted-pt", *model("evil.pt"), r"evil.pt is not a readable checkpoint"),
    ]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def make_bad_files(s, tmp):
    torch.save({"x": 1}, tmp / "empty.pt")
    (tmp / "empty.pt").write_bytes(b"")
    shutil.copy(s["pre"], tmp / "trunc.pt")
    with open(tmp / "trunc.pt", "r+b") as f:
        f.truncate(2000)
    torch.save([1, 2, 3], tmp / "alien.pt")
    ck = load_checkpoint(s["pre"])
    torch.save(dict(ck, config={}), tmp / "noconf.pt")
    os.makedirs(tmp / "evaltrunc")
    shutil.copy(tmp / "trunc.pt", tmp / "evaltrunc" / "ckpt.pt")
    os.makedirs(tmp / "badtok")
    (tmp / "badtok" / "tokenizer.json").write_text("{not json")
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    for d, (train, validation) in DATA.items():
        tsv(str(tmp / d), "sst2", train, validation)
    os.makedirs(tmp / "d6" / "cnndm")
    for n in ("train", "validation"):
        (tmp / "d6" / "cnndm" / f"{n}.jsonl").write_text('{"article": "a story"}\n')
    Evil.marker = str(tmp / "PWNED")
    torch.save({"model": Evil(), "config": ck["config"]}, tmp / "evil.pt")


@pytest.fixture(scope="module")
def bad(smoke, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    make_bad_files(smoke, tmp)
    return {c[0]: c[1:] for c in cases(smoke, tmp)}, tmp


CASE_IDS = [c[0] for c in cases({k: "" for k in ("pre", "ct", "ft", "bd", "tok", "out")}, "/t")]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_gives_one_line_and_loses_nothing(case, smoke, bad):
    table, tmp = bad
    *cmd, pattern = table[case]
    before = digests(smoke["out"])
    p = run(*cmd, env={"HF_HUB_OFFLINE": "1"})
    assert_one_error_line(p, pattern)
    assert digests(smoke["out"]) == before          # no checkpoint or results file of a run was touched
    assert not os.path.exists(tmp / "PWNED")        # no pickle ran code


def test_a_second_run_into_a_busy_out_dir_fails_at_once(smoke):
    before = digests(smoke["out"])
    fd = os.open(os.path.join(smoke["bd"], ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on testhost: distill.py ...")
    try:
        t0 = time.time()
        p = run("distill.py", "--task", "sst2", "--eval_only", "--out_dir", smoke["bd"])
        assert_one_error_line(p, r"in use by a running job \(pid 4242 on testhost")
        assert time.time() - t0 < 60
    finally:
        os.close(fd)
    assert digests(smoke["out"]) == before


def test_finished_run_prints_its_own_row_and_exits_0_among_foreign_files(smoke, tmp_path):
    # a list (toy.py's results.json), a foreign dict and a truncated file beside the run: ignored
    exp = os.path.dirname(smoke["ft"])
    for name, text in (("listy", "[1, 2]"), ("foreign", '{"a": 1}'), ("cut", '{"task": "ss')):
        os.makedirs(os.path.join(exp, name), exist_ok=True)
        with open(os.path.join(exp, name, "results.json"), "w") as f:
            f.write(text)
    p = run("distill.py", "--task", "sst2", "--eval_only", "--out_dir", smoke["ft"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "FP16-SFT" in p.stdout and "BitDistill" not in p.stdout          # its own row only
    p = run("distill.py", "--table", exp)                                   # the experiment, named
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(r in p.stdout for r in ("FP16-SFT", "BitNet-SFT", "BitDistill"))
    assert p.stderr.count("warning: skipped") == 3
    for name in ("listy", "foreign", "cut"):
        shutil.rmtree(os.path.join(exp, name))


def test_ctrl_c_says_where_the_last_checkpoint_is(smoke, tmp_path):
    out = tmp_path / "long"
    cmd = [sys.executable, os.path.join(HERE, "continue_train.py"), "--init", smoke["pre"], "--tokens", "1e7",
           "--block_size", "32", "--batch_size", "2", "--eval_interval", "2", "--eval_iters", "1",
           "--out_dir", str(out)]
    # the child starts with Ctrl-C at its default, as from a terminal: a shell's background job (`pytest &`)
    # ignores SIGINT, and an ignored SIGINT is inherited, so Python in the child would never see it
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                         env={**os.environ, "BITDISTILL_DATA": os.environ["BITDISTILL_DATA"]},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not (out / "ckpt.pt").exists() and time.time() - t0 < 120:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("continue_train.py: interrupted; the last checkpoint is")
    step = load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert f"(step {step})" in err and not glob.glob(str(out / ".*.tmp*"))


def test_a_full_disk_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    harness.write_json(path, {"a": 1})
    before = path.read_bytes()

    def full(tmp):
        with open(tmp, "w") as f:
            f.write("{partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(harness.SaveError, match=f"no space left on {tmp_path}: the previous results.json is intact"):
        harness.atomic_write(str(path), full)

    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 45")
    with pytest.raises(harness.SaveError, match="no space left on"):
        harness.atomic_write(str(path), torch_full)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["results.json"]   # no temp file left
    (tmp_path / ".results.json.tmp999999").write_text("left by a killed run")
    harness.clean_stale_tmp(str(tmp_path))
    assert os.listdir(tmp_path) == ["results.json"]


def copy_of_the_repo(tmp_path):
    d = tmp_path / "repo"
    d.mkdir()
    for f in glob.glob(os.path.join(HERE, "*.py")) + glob.glob(os.path.join(HERE, "*.[ch]")):
        shutil.copy(f, d)
    return d


def test_c_kernels_without_a_compiler(tmp_path, smoke):
    repo = copy_of_the_repo(tmp_path)
    no_cc = {"PATH": str(tmp_path / "empty_bin"), "CC": "cc"}
    p = run("packed.py", "--ckpt", smoke["bd"] + "/ckpt.pt", env=no_cc, cwd=repo)
    assert_one_error_line(p, r"the C kernels are missing and cannot be built: no C compiler found")
    p = run("packed.py", "--ckpt", smoke["bd"] + "/ckpt.pt", env={"CC": "false"}, cwd=repo)
    assert_one_error_line(p, r"compiling ternary_cpu.c with \S*false failed")
    # a damaged (truncated) module: rebuilt when a compiler is there, an error line when not
    assert run("build_ffi.py", cwd=repo).returncode == 0
    so = glob.glob(str(repo / "_ternary_cpu*.so"))[0]
    good = open(so, "rb").read()
    open(so, "wb").write(good[:4096])
    p = run("packed.py", "--ckpt", smoke["bd"] + "/ckpt.pt", env=no_cc, cwd=repo)
    assert_one_error_line(p, r"the C kernels are damaged and cannot be built")
    # out of date and no compiler: used, with a warning
    open(so, "wb").write(good)
    os.utime(repo / "ternary_cpu.c", (time.time() + 10, time.time() + 10))
    p = run("packed.py", "--ckpt", smoke["bd"] + "/ckpt.pt", env=no_cc, cwd=repo)
    assert p.returncode == 0 and "WARNING: ternary_cpu.c changed" in p.stderr, p.stderr[-2000:]


def test_grad_clip_0_means_off(smoke, tmp_path):
    import distill
    base = load_model(smoke["pre"])
    distill.main(["--task", "sst2", "--method", "fp16-sft", "--model", smoke["pre"], "--max_steps", "2",
                  "--batch_size", "2", "--micro_batch_size", "2", "--eval_limit", "2", "--max_len", "64",
                  "--grad_clip", "0", "--lr", "1e-3", "--warmup_steps", "0", "--prompt", "plain",
                  "--out_dir", str(tmp_path / "r")])
    tuned = load_model(str(tmp_path / "r" / "ckpt.pt"))
    moved = max((a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters()))
    assert moved > 1e-4                                               # it learned: 0 is "off", not "clip to 0"


def test_bare_commands_offline_point_to_what_works(tmp_path, data_dir):
    # the design's bare commands: stage 2 of Qwen3-0.6B, and BitDistill on SST-2; offline, one line
    # that says what is missing and what to run instead (no circular advice)
    offline = {"HF_HUB_OFFLINE": "1", "BITDISTILL_DATA": data_dir}
    p = run("continue_train.py", env=offline, workdir=tmp_path)
    assert_one_error_line(p, r"could not download 'Qwen/Qwen3-0.6B' .*no connection to the hub.* python toy.py")
    p = run("continue_train.py", env={"HF_HUB_OFFLINE": "1", "BITDISTILL_DATA": ""}, workdir=tmp_path)
    assert_one_error_line(p, r"could not stream 'tiiuae/falcon-refinedweb' .* python toy.py")
    p = run("distill.py", "--task", "sst2", env=offline, workdir=tmp_path)
    assert_one_error_line(p, r"run first: `python continue_train.py --model Qwen/Qwen3-0.6B --out_dir out/continue_train` "
                             r".*, then `python distill.py --task sst2 --method fp16-sft --model Qwen/Qwen3-0.6B --out_dir "
                             r"out/sst2-fp16-sft`.* python toy.py")
    assert not os.path.exists(tmp_path / "out" / "sst2-bitdistill")   # nothing created before the check


def test_bench_writes_json_anywhere_with_the_default_figure(tmp_path, tiny_hf):
    """bench.py with --json outside out/ and the default --plot (out/bench.png, in a folder that does
    not exist yet), as ../shared/peer/run.sh calls it: both files written, no traceback at the end;
    on a tiny geometry (an HF folder's config: --model takes any model path for its shapes)."""
    p = run("bench.py", "--model", tiny_hf, "--quick", "--backends", "ternary-int8-head", "--prompt_lens", 8,
            "--no_kernels", "--json", tmp_path / "some" / "dir" / "bench.json", workdir=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    with open(tmp_path / "some" / "dir" / "bench.json") as f:
        assert json.load(f)["backends"][0]["model"] == tiny_hf
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    p = run("bench.py", "--model", tmp_path / "nothere.gguf", "--quick", workdir=tmp_path)
    assert_one_error_line(p, r"bench.py: error: no GGUF file at")


# ----------------------------------------------------------------------------- loaders' errors, and the layout the README describes

def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        Qwen3.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="Hugging Face hub"):  # offline here
        Qwen3.from_pretrained("no-such-org-bitdistill/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3.from_pretrained(str(tmp_path / "empty"))
    _, path = make_hf(tmp_path, "qwen3")
    cfg = json.load(open(os.path.join(path, "config.json")))
    bad = tmp_path / "llama"
    bad.mkdir()
    json.dump(dict(cfg, model_type="gemma3"), open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported model_type .gemma3."):
        Qwen3.from_pretrained(str(bad))
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Qwen3.from_pretrained(str(bad))
    # a config.json from another model size: shape mismatch, named
    os.replace(os.path.join(path, "config.json"), tmp_path / "c.json")
    json.dump(dict(cfg, intermediate_size=80), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="shape mismatch for model.layers.0.mlp.gate_proj.weight"):
        Qwen3.from_pretrained(path)
    # a config.json that claims qwen2 (q/k/v bias) for a qwen3 checkpoint: missing keys, named
    json.dump(dict(cfg, model_type="qwen2"), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="missing.*q_proj.bias"):
        Qwen3.from_pretrained(path)
    with pytest.raises(ValueError, match="not a bitdistill checkpoint"):
        torch.save({"weights": 1}, tmp_path / "x.pt")
        load_model(str(tmp_path / "x.pt"))
    m = Qwen3(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


SCRIPTS = {"continue_train", "distill", "toy", "bench"}   # commands; everything else is a library module


def test_layout_stage_scripts_are_leaves():
    """The structure the README describes: the two stages share only library modules, no library
    imports a script, every function stays readable (< 100 lines). A file holds one concept, at
    whatever length that concept takes."""
    import ast
    import glob
    here = os.path.dirname(os.path.abspath(__file__))
    imports = {}
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        name = os.path.basename(path)[:-3]
        with open(path, encoding="utf-8") as f:
            src = f.read()
        tree = ast.parse(src)
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module.split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 100, f"{name}.{node.name} is {node.end_lineno - node.lineno + 1} lines"
        imports[name] = mods
    assert "distill" not in imports["continue_train"] and "continue_train" not in imports["distill"]
    for name, mods in imports.items():
        if name not in SCRIPTS and not name.startswith("test_"):
            assert not mods & SCRIPTS, f"library module {name}.py imports the script(s) {mods & SCRIPTS}"
