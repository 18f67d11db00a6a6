#!/bin/bash
# Does the toy teacher know the domain? FP16-SFT from a randomly initialised model of the same
# configuration (no pretraining), against the toy's FP16-SFT from the pretrained LM. The random
# checkpoint is continue_train.py's own: one step at lr 1e-9 (no step at all is refused).
# The committed runs beside this script (random/, fp_random/, fp_random_seed1-3/ and their logs) are
# these commands' output with OUT=/work/toyout, D=/work/diag. Run from the repository root after `python toy.py --out OUT` (it reads OUT/tiny.json and the vocabulary).
set -e
OUT=${1:-out/toy}
D=${2:-out/toy_no_pretraining}
export BITDISTILL_DATA=${BITDISTILL_DATA:-../shared/data}
python continue_train.py --from_scratch --model_config $OUT/tiny.json --quant none \
  --tokenizer $OUT/tokenizer/vocab.tiktoken --out_dir $D/random --seed 0 --tokens 2048 --block_size 128 \
  --batch_size 16 --lr 1e-9 --eval_interval 100 --eval_iters 1 --data $BITDISTILL_DATA/corpus/tinyshakespeare.txt
# held-out train rows (the same grid point the pretrained FP16-SFT uses, lr 3e-3), then validation, seeds 1-3
python distill.py --method fp16-sft --out_dir $D/fp_random --seed 1 --eval_on heldout --lr 3e-3 --model $D/random/ckpt.pt \
  --recipe authors --prompt plain --task sst2 --train_limit 1000 --heldout 1000 --epochs 3 --batch_size 32 \
  --micro_batch_size 32 --max_len 128 --eval_batch_size 64
for seed in 1 2 3; do
  python distill.py --method fp16-sft --out_dir $D/fp_random_seed$seed --seed $seed --eval_on validation --lr 3e-3 \
    --model $D/random/ckpt.pt --recipe authors --prompt plain --task sst2 --train_limit 1000 --heldout 1000 \
    --epochs 3 --batch_size 32 --micro_batch_size 32 --max_len 128 --eval_batch_size 64
done
