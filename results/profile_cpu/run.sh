#!/usr/bin/env bash
# CPU figures of --profile on the quick start's toy models (run `python toy.py` first; TOY = its
# output folder, out/toy by default). From the project root:
#     bash results/profile_cpu/run.sh [TOY] 2>/dev/null > results/profile_cpu/console.txt
# Stage 2 from scratch at the toy's shape (tiny.json), full precision and 1.58-bit, eager and
# compiled; stage 3 on SST-2 at batch 32, BitNet-SFT and BitDistill (student: the toy's stage-2
# model; teacher: an FP16-SFT run), BitDistill also compiled; then the quantizers and one
# BitLinear against nn.Linear at Qwen3-0.6B's q_proj shape (python profiling.py).
set -euo pipefail
TOY=${1:-out/toy}
DATA=${BITDISTILL_DATA:-../shared/data}
TEACHER=${TEACHER:-$TOY/authors/sst2/seed1/fp16sft/ckpt.pt}   # the quick start's teacher
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
for c in --no_compile --compile; do
  for q in none bitnet; do
    echo "\$ continue_train.py --quant $q $c"
    python continue_train.py --from_scratch --model_config "$TOY/tiny.json" --tokenizer "$TOY/tokenizer/vocab.tiktoken" \
        --data_dir "$DATA" --quant $q --block_size 256 --batch_size 8 --profile 5 $c | grep '^profile'
  done
done
echo "\$ distill.py --method bitnet-sft --no_compile"
python distill.py --task sst2 --method bitnet-sft --model "$TOY/authors/ct/ckpt.pt" --prompt plain --data_dir "$DATA" \
    --batch_size 32 --micro_batch_size 32 --profile 5 --no_compile | grep '^profile'
for c in --no_compile --compile; do
  echo "\$ distill.py --method bitdistill $c"
  python distill.py --task sst2 --method bitdistill --student "$TOY/authors/ct/ckpt.pt" --teacher "$TEACHER" --prompt plain \
      --data_dir "$DATA" --batch_size 32 --micro_batch_size 32 --profile 5 $c | grep '^profile'
done
echo "\$ profiling.py"
python profiling.py | grep -v '^QUANTPROFILE'
