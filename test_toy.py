"""The toy pipeline (toy.py, the README's quick start) in its smoke preset: a few steps per stage,
checking that every stage hands a loadable checkpoint to the next and that the report is written."""
import json
import os
import subprocess

import torch

import toy
from training import load_model


def test_toy_pipeline_smoke(tmp_path, data_dir):
    out = tmp_path / "toy"
    toy.main(["--preset", "smoke", "--out", str(out), "--data_dir", data_dir, "--ablations"])
    teacher = load_model(str(out / "pretrain" / "ckpt.pt"))
    assert not teacher.config.bitnet and teacher.config.vocab_size == 512
    out = out / "authors"                                  # every stage after pretraining: --recipe authors
    for name, subln in (("ct", True), ("ct_nosubln", False)):
        student = load_model(str(out / name / "ckpt.pt"))  # strict load
        assert student.config.bitnet and student.config.subln == subln and student.config.subln_all == subln
    res = json.load(open(out / "results.json"))
    rows = res["rows"]
    assert [r["row"] for r in rows] == [r[0] for r in toy.sft_runs(True)]
    assert [r["pair"] for r in res["paired"]] == ["BitDistill - BitNet-SFT", "BitDistill - FP16-SFT"]
    assert all(r["std"] is None for r in rows)             # one seed: no spread (null, not NaN)
    assert res["recipe"] == "authors" and res["seeds"] == [1]
    head = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    ft = json.load(open(os.path.join(toy.run_dir(str(out), "sst2", 1, "FP16-SFT"), "results.json")))
    for prov in (res["provenance"], ft["provenance"]):   # where each results file came from
        assert prov["commit"] == head and prov["threads"] >= 1 and prov["torch"] == torch.__version__
    assert ft["args"]["loaded_from"] == str(out.parent / "pretrain" / "ckpt.pt")   # what was really loaded
    assert ft["provenance"]["command"][0] == "distill.py" and ft["provenance"]["wall_s"] > 0
    for row, _, method, *_ in toy.sft_runs(True):
        d = toy.run_dir(str(out), "sst2", 1, row)
        res = json.load(open(os.path.join(d, "results.json")))
        assert res["method"] == method and res["n_eval"] == 8 and 0 <= res["metrics"]["ACC"] <= 100
        m = load_model(os.path.join(d, "ckpt.pt"))
        assert m.config.bitnet == (method != "fp16-sft")
        with torch.no_grad():
            assert torch.isfinite(m(torch.tensor([[1, 2, 3]]))).all()
    assert (out / "toy.png").stat().st_size > 10_000 and (out / "results.csv").exists()
    # a finished stage is not run again: a second call only re-reads the results
    before = os.path.getmtime(out / "ct" / "ckpt.pt")
    toy.main(["--preset", "smoke", "--out", str(out.parent), "--data_dir", data_dir, "--ablations"])
    assert os.path.getmtime(out / "ct" / "ckpt.pt") == before
    # SubLN before all seven projections, through stage 2 -> stage 3 -> packed inference: the
    # BitDistill checkpoint packs, and its greedy tokens equal the fake-quantized model's
    from packed import PackedQwen3
    model = load_model(os.path.join(toy.run_dir(str(out), "sst2", 1, "BitDistill"), "ckpt.pt")).eval()
    assert model.config.subln_all
    pm = PackedQwen3.from_bitnet(model, "fp32")
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pm.generate(idx, 16), model.generate(idx, 16))


def test_readme_recipe_table_is_the_results_files():
    # the README's recipe table is exactly what `python toy.py --compare results/toy_recipes/authors
    # results/toy_recipes/paper` prints from the committed results files: a stale figure fails
    here = os.path.dirname(os.path.abspath(__file__))
    table = toy.compare_table([os.path.join(here, "results", "toy_recipes", r) for r in ("authors", "paper")])
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert table in readme
    # the check bites: the same README with one figure changed (a copy, in memory) fails it
    first_row = table.splitlines()[2]                     # | FP16-SFT | 75.46 ± 1.28 | ...
    mean = first_row.split("|")[2].split("±")[0].strip()
    stale = readme.replace(first_row, first_row.replace(mean, f"{float(mean) + 0.01:.2f}", 1))
    assert stale != readme and table not in stale
