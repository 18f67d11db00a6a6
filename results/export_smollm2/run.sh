#!/usr/bin/env bash
# The export issue's end-to-end check on the real model: the SmolLM2-135M-Instruct BitDistill student with
# the paper's SubLN placement (--subln_at o_down; stage 2 and stage 3 as results/smollm2_table1's seed 1,
# flags in each results file), exported for llama.cpp exact (F32 codes) and compact (Q2_0), read back
# (--check), and run in llama.cpp itself (llama-cpp-python): logits, greedy tokens and SST-2 validation
# accuracy against ours. From the project root, BITDISTILL_DATA set, llama-cpp-python installed:
#     bash results/export_smollm2/run.sh [STUDENT_CKPT]
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT=${1:-out/smollm2/authors/sst2/seed1/bitdistill-o_down/ckpt.pt}
R=results/export_smollm2
OUT=${OUT:-out/export_smollm2}
mkdir -p "$OUT"
python export.py --ckpt "$CKPT" --out "$OUT/student-f32.gguf" --overwrite
python export.py --ckpt "$CKPT" --out "$OUT/student-q2_0.gguf" --compact --overwrite
for f in f32 q2_0; do
  python export.py --ckpt "$CKPT" --check "$OUT/student-$f.gguf" | tee "$R/check-$f.txt"
  rm -f "$R/llama_cpp-$f.json"
  python export.py --ckpt "$CKPT" --in_llama_cpp "$OUT/student-$f.gguf" --task_accuracy --json "$R/llama_cpp-$f.json" \
    2>/dev/null | grep -v '^LLAMACPP'
done
rm -f "$R/llama_cpp-f32-f32cache.json"     # the exact file with an fp32 KV cache: logits and greedy tokens only
python export.py --ckpt "$CKPT" --in_llama_cpp "$OUT/student-f32.gguf" --f32_cache --json "$R/llama_cpp-f32-f32cache.json" \
  2>/dev/null | grep -v '^LLAMACPP'
# The student (training/): stage 2 `continue_train.py --init smollm2 --quant bitnet --recipe authors --subln
# --subln_at o_down --tokens 2e5 --block_size 256 --batch_size 8 --lr 1e-3 --eval_interval 25 --eval_iters 8
# --seed 1 --data <corpus: c4_sample.jsonl wikitext2_test.raw tinyshakespeare.txt>`, then
# `distill.py --method bitdistill --student <that ckpt> --teacher <smollm2_table1 seed-1 fp16sft ckpt>` with
# the seed-1 BitDistill row's flags (training/bitdistill-o_down-results.json, "provenance" and "args"). Both ran
# at fc419fd, before --quant_eps existed (ε added, the paper's form): pass --quant_eps add to stage 2 to repeat them.
