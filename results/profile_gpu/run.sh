#!/usr/bin/env bash
# The training-speed GPU figures in one sitting, on random weights of Qwen3-0.6B's geometry (no hub, no
# internet: the device machine has neither). From the project root:
#     bash results/profile_gpu/run.sh DATA SCRATCH [stage2] [stall] [stage3] [quant]
# DATA: the offline data folder (tokenizers/qwen3, corpus, glue/sst2); SCRATCH: a folder for the
# stage-3 checkpoints (~7 GB each at 0.6B). Parts (all by default), each one line per figure:
#   stage2  continue_train.py --profile 10 at B x T: full precision and 1.58-bit, eager and compiled
#   stall   a compiled stage-2 run with three evaluations, every output line time-stamped (s since
#           start), and the recompiles torch logs: the evaluation stall, if any
#   stage3  distill.py --profile 10 with the authors' recipe at batch 32: FP16-SFT, BitDistill eager
#           and compiled (student and teacher: one-step stage-2 checkpoints of the same geometry)
#   quant   python profiling.py --dtype bfloat16: the quantizers and one BitLinear vs nn.Linear
# GEOMETRY (a Qwen3Config JSON; default Qwen3-0.6B's), B (4), T (2048), B3 (32) override the sizes
# (a CPU check of this script: a tiny geometry with vocab_size 151936, B=2 T=64 B3=4).
set -euo pipefail
DATA=${1:?DATA: the offline data folder}; SCRATCH=${2:?SCRATCH: a folder for checkpoints}; shift 2
PARTS=${*:-stage2 stall stage3 quant}
B=${B:-4}; T=${T:-2048}; B3=${B3:-32}
mkdir -p "$SCRATCH"
CFG=${GEOMETRY:-$SCRATCH/qwen3-0.6b.json}
[ -n "${GEOMETRY:-}" ] || python -c "import json, sys, bench; json.dump(bench.qwen3_06b().to_dict(), open(sys.argv[1], 'w'))" "$CFG"
TOK="$DATA/tokenizers/qwen3"
DEVICE=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $DEVICE, torch $(python -c 'import torch; print(torch.__version__)'), geometry $(basename "$CFG"), B=$B T=$T B3=$B3"
stage2() { python continue_train.py --from_scratch --model_config "$CFG" --tokenizer "$TOK" --data_dir "$DATA" \
               --block_size "$T" --batch_size "$B" "$@"; }
# stamp: the lines (split at \r too: tqdm's bars) that match $1, each with the seconds since the start
stamp() { python -u -c "
import re, sys, time
t0, buf = time.time(), ''
for ch in iter(lambda: sys.stdin.read(1), ''):
    if ch in '\r\n':
        if re.search(sys.argv[1], buf):
            print(f'{time.time() - t0:8.1f}s {buf}', flush=True)
        buf = ''
    else:
        buf += ch" "$1"; }
LOG="$SCRATCH/stderr.log"   # the scripts' progress bars and warnings; its end is shown on a failure
trap 'echo "run.sh: failed; the end of $LOG:" >&2; tail -n 20 "$LOG" >&2' ERR
for part in $PARTS; do
  case $part in
  stage2)
    for c in --no_compile --compile; do
      for q in none bitnet; do
        echo "\$ continue_train.py --quant $q $c"
        stage2 --quant $q --profile 10 $c 2>>"$LOG" | grep '^profile'
      done
    done ;;
  stall)
    echo "\$ continue_train.py --compile, 30 steps, evaluation every 10 (5 batches)"
    rm -rf "$SCRATCH/stall"
    PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles stage2 --tokens $((B * T * 30)) --eval_interval 10 --eval_iters 5 \
        --compile --out_dir "$SCRATCH/stall" 2>&1 | stamp '^step|Recompiling|triggered|validation: 100' ;;
  stage3)
    for q in none bitnet; do   # one-step stage-2 runs: an fp teacher and a 1.58-bit student of this geometry
      [ -f "$SCRATCH/$q/ckpt.pt" ] || stage2 --quant $q --tokens $((B * T)) --eval_iters 1 --out_dir "$SCRATCH/$q" >>"$LOG" 2>&1
    done
    common=(--task sst2 --data_dir "$DATA" --batch_size "$B3" --micro_batch_size "$B3" --max_len 512 --profile 10)
    echo "\$ distill.py --method fp16-sft --no_compile"
    python distill.py "${common[@]}" --method fp16-sft --model "$SCRATCH/none/ckpt.pt" --no_compile 2>>"$LOG" | grep '^profile'
    for c in --no_compile --compile; do
      echo "\$ distill.py --method bitdistill $c"
      python distill.py "${common[@]}" --method bitdistill --student "$SCRATCH/bitnet/ckpt.pt" \
          --teacher "$SCRATCH/none/ckpt.pt" $c 2>>"$LOG" | grep '^profile'
    done ;;
  quant)
    echo "\$ profiling.py --dtype bfloat16"
    python profiling.py --dtype bfloat16 2>>"$LOG" | grep -v '^QUANTPROFILE' ;;
  *) echo "run.sh: error: unknown part $part (stage2, stall, stage3, quant)" >&2; exit 2 ;;
  esac
done
