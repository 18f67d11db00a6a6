#!/usr/bin/env bash
# Stage 2 (continued pre-training, Eq. 7) of SmolLM2-135M-Instruct on a CPU: the picture the paper
# motivates stage 2 with. The held-out slice is continue_train.py's validation split of the data
# folder's corpus (the last 5% of each file); the full-precision model's perplexity on it is step 0
# of a --quant none run, the ternarised model's (before training) step 0 of the stage-2 run.
#   bash results/smollm2_stage2/run.sh [OUT]        # BITDISTILL_DATA set; ~45 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-out/smollm2_stage2}
COMMON=(--model smollm2 --block_size 256 --batch_size 8 --eval_iters 8 --seed 1)
python continue_train.py "${COMMON[@]}" --quant none --tokens 2048 --eval_interval 1 --out_dir "$OUT/fp" --overwrite
python continue_train.py "${COMMON[@]}" --tokens 350000 --eval_interval 25 --out_dir "$OUT/ct" --overwrite
mkdir -p results/smollm2_stage2/fp results/smollm2_stage2/ct
cp "$OUT/fp/metrics.json" results/smollm2_stage2/fp/
cp "$OUT/ct/metrics.json" "$OUT/ct/loss.png" "$OUT/ct/train_log.csv" results/smollm2_stage2/ct/
python continue_train.py --plot results/smollm2_stage2/fp/metrics.json results/smollm2_stage2/ct/metrics.json \
    --plot_out results/smollm2_stage2/stage2.png
