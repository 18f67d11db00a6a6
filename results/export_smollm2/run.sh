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
