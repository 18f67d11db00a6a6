#!/usr/bin/env bash
# Copies a toy run's results (everything but checkpoints, lock files, the unlabeled text and the
# vocabulary) into results/: the Table 4 run and the Gemma 3 run (docs/results.md, "Tables 3 and 4").
#   bash results/toy_table4/collect.sh out/toy-table4 results/toy_table4
set -euo pipefail
src=$(cd "$1" && pwd); dst=$(mkdir -p "$2" && cd "$2" && pwd)
cd "$src" && find . -type f ! -name '*.pt' ! -name '.lock' ! -path './unlabeled/*' ! -path './tokenizer/*' \
    -exec cp --parents {} "$dst" \;
