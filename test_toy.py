"""The toy pipeline (toy.py, the README's quick start) in its smoke preset: a few steps per stage,
checking that every stage hands a loadable checkpoint to the next and that the report is written."""
import glob
import json
import os
import subprocess

import pytest
import torch

import tasks
import toy
from model import load_model


def test_toy_pipeline_smoke(tmp_path, data_dir):
    out = tmp_path / "toy"
    toy.main(["--preset", "smoke", "--out", str(out), "--data_dir", data_dir, "--ablations", "--layer_sweep",
              "--weight_quants", "gptq"])
    teacher = load_model(str(out / "pretrain" / "ckpt.pt"))
    assert not teacher.config.bitnet and teacher.config.vocab_size == 512
    # the toy LLM read the tasks' training sentences, never a label and never a validation row
    text = (out / "unlabeled" / "glue_train_text.txt").read_text(encoding="utf-8").splitlines()
    sst2_train = tasks.load_examples("sst2", "train", data_dir)
    assert text[:3] == [ex["sentence"] for ex in sst2_train[:3]] and not any("\t" in t for t in text)
    assert not {ex["sentence"] for ex in tasks.load_examples("sst2", "validation", data_dir)} & set(text)
    pre_args = json.load(open(out / "pretrain" / "metrics.json"))["args"]
    assert any(f.endswith("glue_train_text.txt") for f in pre_args["data"])
    # every results / metrics file names the model it loaded, never an unused default hub id
    written = glob.glob(str(out / "**" / "results.json"), recursive=True) + \
        glob.glob(str(out / "**" / "metrics.json"), recursive=True)
    assert len(written) >= 8 and not [f for f in written if "Qwen/Qwen3-0.6B" in open(f).read()]
    assert pre_args["init"] is None and pre_args["from_scratch"]
    out = out / "authors"                                  # every stage after pretraining: --recipe authors
    for name, subln, wq in (("ct", True, "absmean"), ("ct_nosubln", False, "absmean"), ("ct-gptq", True, "gptq")):
        student = load_model(str(out / name / "ckpt.pt"))  # strict load
        assert student.config.bitnet and student.config.subln == subln and student.config.subln_all == subln
        assert student.config.weight_quant == wq          # Table 4: stage 2 with each quantizer
    res = json.load(open(out / "sst2" / "results.json"))
    rows = res["rows"]
    runs = toy.sft_runs(True, [0], quantizers=["gptq"])
    assert [r["row"] for r in rows] == [r[0] for r in runs]   # smoke: 2 layers, the recipe's is 1
    assert rows[-2]["tables"] == "3b" and rows[-1]["row"] == "BitDistill (gptq)" and res["labels"] == 16 and res["heldout_rows"] == 8
    assert [r["pair"] for r in res["paired"]] == ["FP16-SFT - BitNet-SFT", "BitDistill - BitNet-SFT",
                                                   "BitDistill - FP16-SFT", "BitDistill - BitNet-SFT + SubLN + CT",
                                                   "BitDistill (gptq) - BitDistill"]
    assert [r["distill_layer"] for r in rows if r["row"].startswith("BitDistill")] == [1, None, 1, 1, 0, 1]
    assert all(r["std"] is None for r in rows)             # one seed: no spread (null, not NaN)
    assert res["recipe"] == "authors" and res["seeds"] == [1]
    head = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    ft = json.load(open(os.path.join(toy.run_dir(str(out), "sst2", 1, "FP16-SFT"), "results.json")))
    for prov in (res["provenance"], ft["provenance"]):   # where each results file came from
        assert prov["commit"] == head and prov["threads"] >= 1 and prov["torch"] == torch.__version__
    assert ft["args"]["loaded_from"] == str(out.parent / "pretrain" / "ckpt.pt")   # what was really loaded
    assert ft["args"]["n_train_rows"] == 16 and ft["eval_on"] == "validation" and ft["args"]["heldout"] == 8
    assert ft["provenance"]["command"][0] == "distill.py" and ft["provenance"]["wall_s"] > 0
    for row, _, method, flags, init in runs:
        d = toy.run_dir(str(out), "sst2", 1, row)
        res = json.load(open(os.path.join(d, "results.json")))
        assert res["method"] == method and res["n_eval"] == 8 and 0 <= res["metrics"]["ACC"] <= 100
        m = load_model(os.path.join(d, "ckpt.pt"))
        assert m.config.bitnet == (method != "fp16-sft")
        assert m.config.weight_quant == ("gptq" if init == "ct-gptq" else "absmean")
        if "--distill_layer" in flags:
            assert str(res["args"]["distill_layer"]) == "0"
        with torch.no_grad():
            assert torch.isfinite(m(torch.tensor([[1, 2, 3]]))).all()
    assert (out / "sst2" / "toy.png").stat().st_size > 10_000 and (out / "sst2" / "results.csv").exists()
    # a finished stage is not run again: a second call only re-reads the results
    before = os.path.getmtime(out / "ct" / "ckpt.pt")
    toy.main(["--preset", "smoke", "--out", str(out.parent), "--data_dir", data_dir, "--ablations"])
    assert os.path.getmtime(out / "ct" / "ckpt.pt") == before
    # part of the pipeline (--rows): the named rows and the teacher; the folder's tables are not replaced
    before = os.path.getmtime(out / "sst2" / "results.json")
    toy.main(["--preset", "smoke", "--out", str(out.parent), "--data_dir", data_dir, "--weight_quants", "gptq",
              "--rows", "BitDistill (gptq)"])
    assert os.path.getmtime(out / "sst2" / "results.json") == before
    with pytest.raises(SystemExit, match="not rows of this pipeline"):
        toy.main(["--preset", "smoke", "--out", str(out.parent), "--data_dir", data_dir, "--rows", "BitDistill (awq)"])
    # the paper's recipe: its own stage 2 (SubLN before o_proj and down_proj only) and stage 3 runs,
    # each handing a strictly loadable checkpoint to the next
    toy.main(["--preset", "smoke", "--out", str(out.parent), "--data_dir", data_dir, "--recipe", "paper"])
    paper = out.parent / "paper"
    student = load_model(str(paper / "ct" / "ckpt.pt"))
    assert student.config.bitnet and student.config.subln and not student.config.subln_all
    assert json.load(open(paper / "sst2" / "results.json"))["recipe"] == "paper"
    for row, _, method, *_ in toy.sft_runs(False):
        d = toy.run_dir(str(paper), "sst2", 1, row)
        assert json.load(open(os.path.join(d, "results.json")))["args"]["recipe"] == "paper"
        assert load_model(os.path.join(d, "ckpt.pt")).config.bitnet == (method != "fp16-sft")
    # --select: every grid point scored on the held-out train rows, none on the validation rows
    toy.main(["--preset", "smoke", "--out", str(out.parent), "--data_dir", data_dir, "--select"])
    sel = json.load(open(out / "sst2" / "selection.json"))
    assert len(sel["points"]) == 4 and set(sel["chosen"]) == {"fp16-sft", "bitnet-sft", "bitdistill"}
    for p in sel["points"]:
        r = json.load(open(os.path.join(p["run"], "results.json")))
        assert r["eval_on"] == "heldout" and r["n_eval"] == 8 and r["metrics"]["ACC"] == p["heldout_acc"]
    best = max((p for p in sel["points"] if p["method"] == "bitdistill"), key=lambda p: p["heldout_acc"])
    assert best["heldout_acc"] == max(p["heldout_acc"] for p in sel["points"] if p["hp"] == sel["chosen"]["bitdistill"]
                                      and p["method"] == "bitdistill")
    # SubLN before all seven projections, through stage 2 -> stage 3 -> packed inference: the
    # BitDistill checkpoint packs, and its greedy tokens equal the fake-quantized model's
    from packed import PackedQwen3
    model = load_model(os.path.join(toy.run_dir(str(out), "sst2", 1, "BitDistill"), "ckpt.pt")).eval()
    assert model.config.subln_all
    pm = PackedQwen3.from_bitnet(model, "fp32")
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pm.generate(idx, 16), model.generate(idx, 16))


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "toy_fewlabels")


def test_every_committed_results_file_is_strict_json():
    """Strict JSON has no NaN / Infinity: every .json under results/ parses with them refused."""
    def refuse(c):
        raise ValueError(f"{c} is not JSON")
    files = glob.glob(os.path.join(os.path.dirname(RESULTS), "**", "*.json"), recursive=True)
    assert len(files) > 50
    for f in files:
        with open(f, encoding="utf-8") as fh:
            json.load(fh, parse_constant=refuse)


def test_readme_tables_are_the_results_files():
    # docs/results.md's toy tables are exactly what `python toy.py --compare results/toy_fewlabels/authors/T
    # results/toy_fewlabels/paper/T` prints from the committed results files: a stale figure fails
    with open(os.path.join(os.path.dirname(RESULTS), "..", "docs", "results.md"), encoding="utf-8") as f:
        readme = f.read()
    for task in ("sst2", "qnli"):
        table = toy.compare_table([os.path.join(RESULTS, r, task) for r in ("authors", "paper")])
        assert table in readme, task
        assert toy.selection_table(os.path.join(RESULTS, "authors", task)) in readme, task
    for run in ("toy_table4/authors/sst2", "toy_gemma3/authors/mnli"):     # Tables 4 and 3 at toy scale
        assert toy.compare_table([os.path.join(os.path.dirname(RESULTS), run)]) in readme, run
    # the check bites: the same README with one figure changed (a copy, in memory) fails it
    first_row = table.splitlines()[2]                     # | FP16-SFT | 75.46 ± 1.28 | ...
    mean = first_row.split("|")[2].split("±")[0].strip()
    stale = readme.replace(first_row, first_row.replace(mean, f"{float(mean) + 0.01:.2f}", 1))
    assert stale != readme and table not in stale


def test_quick_preset_is_what_the_heldout_grid_chose():
    # the quick preset's learning rates and γ are the points `toy.py --select` scored best on each
    # task's held-out train rows (first grid point on a tie), over the grid toy.py still has
    for task in ("sst2", "qnli"):
        with open(os.path.join(RESULTS, "authors", task, "selection.json")) as f:
            sel = json.load(f)
        assert sel["grid"] == toy.GRID and sel["recipe"] == "authors"
        assert sel["chosen"] == toy.PRESETS["quick"]["hp"][task]
        for method, hp in sel["chosen"].items():
            points = [p for p in sel["points"] if p["method"] == method]
            assert max(points, key=lambda p: p["heldout_acc"])["hp"] == hp
            for p in points:   # each point's accuracy is its run's, on held-out rows
                with open(os.path.join(RESULTS, "authors", task, "select", os.path.basename(p["run"]),
                                       "results.json")) as f:
                    r = json.load(f)
                assert r["eval_on"] == "heldout" and r["metrics"]["ACC"] == p["heldout_acc"]


def test_presets_build():
    # every preset's model is a valid Qwen3 config of the size its help states, and every method has
    # its hyperparameters for every task the toy runs
    from model import Qwen3, Qwen3Config
    sizes = {}
    for name, pre in toy.PRESETS.items():
        if isinstance(pre["model"], str):           # a real pretrained LLM: test_gguf
            continue
        cfg = Qwen3Config.from_dict(dict(pre["model"], vocab_size=pre["vocab"], tie_word_embeddings=True))
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in Qwen3(cfg).parameters())
        assert set(pre["hp"]["sst2"]) == set(pre["grid"]) == {"fp16-sft", "bitnet-sft", "bitdistill"}
        assert pre["heldout"] > 0 and pre["labels"] > 0
    assert round(sizes["quick"] / 1e6, 1) == 4.2 and round(sizes["gpu"] / 1e6) == 29


REAL = os.path.join(os.path.dirname(RESULTS), "smollm2_table1", "authors", "sst2")


def test_real_preset_is_what_its_heldout_grid_chose_and_the_readme_shows_its_table():
    # smollm2-cpu: the students' learning rate is the grid point `toy.py --preset smollm2-cpu --select`
    # scored best on held-out train rows (BitDistill's student shares it, as in the authors' yamls)
    with open(os.path.join(REAL, "selection.json")) as f:
        sel = json.load(f)
    pre = toy.PRESETS["smollm2-cpu"]
    assert sel["grid"] == pre["grid"] and sel["select_flags"] == pre["select_sft"] and sel["heldout_rows"] == pre["heldout"]
    points = [p for p in sel["points"] if p["method"] == "bitnet-sft"]
    best = max(points, key=lambda p: p["heldout_acc"])["hp"]
    assert sel["chosen"]["bitnet-sft"] == best == pre["hp"]["sst2"]["bitnet-sft"] == pre["hp"]["sst2"]["bitdistill"]
    for p in points:
        with open(os.path.join(REAL, "select", os.path.basename(p["run"]), "results.json")) as f:
            r = json.load(f)
        assert r["eval_on"] == "heldout" and r["metrics"]["ACC"] == p["heldout_acc"]
    # the README's first result is what `python toy.py --compare results/smollm2_table1/authors/sst2` prints
    with open(os.path.join(os.path.dirname(RESULTS), "..", "README.md"), encoding="utf-8") as f:
        assert toy.compare_table([REAL]) in f.read()
    res = json.load(open(os.path.join(REAL, "results.json")))
    assert res["model"] == "smollm2" and res["preset"] == "smollm2-cpu" and res["hyperparameters"] == pre["hp"]["sst2"]
    for row, runs in res["runs"].items():           # each row's accuracy is its run's, on the validation rows
        committed = [os.path.join(REAL, *d.split(os.sep)[-2:], "results.json") for d in runs]   # seedN/<row>
        runs = [json.load(open(p)) for p in committed]
        assert [r["eval_on"] for r in runs] == ["validation"] * len(runs) and all(r["n_eval"] == 872 for r in runs)
        assert [r["metrics"]["ACC"] for r in runs] == next(x["accs"] for x in res["rows"] if x["row"] == row)


def test_toy_gemma3_pipeline_smoke(tmp_path, data_dir):
    """--arch gemma3: the toy LM is a Gemma 3 (model.py's gemma3_text), and every stage runs on it."""
    out = tmp_path / "toy-gemma3"
    toy.main(["--preset", "smoke", "--arch", "gemma3", "--task", "mnli", "--out", str(out), "--data_dir", data_dir])
    for ckpt in ("pretrain/ckpt.pt", "authors/ct/ckpt.pt", "authors/mnli/seed1/bitdistill/ckpt.pt"):
        m = load_model(str(out / ckpt))
        assert m.config.gemma and m.config.layer_types == ["sliding_attention", "full_attention"]
        assert m.config.sliding_window == 32 and m.model.layers[0].sandwich
    assert json.load(open(out / "authors" / "mnli" / "results.json"))["task"] == "mnli"
