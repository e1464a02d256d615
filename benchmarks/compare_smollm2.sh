#!/bin/sh
# The committed compare run behind the README's results section: every method at 10/20/30% on SmolLM2-135M.
# Writes benchmarks/results/compare_smollm2/ (cells, results.*, plots, report.html); rerunning it recomputes
# nothing. Then: .venv/bin/python tools/readme_results.py --screenshot
set -e
cd "$(dirname "$0")/.."
exec .venv/bin/prunekit compare --model smollm2-135m \
  --methods magnitude,wanda-sp,flap,llmbip,slimgpt,taylor,shortgpt,pgprune,sleb,blockpruner --ratios 0.1,0.2,0.3 \
  --out benchmarks/results/compare_smollm2 --calib-tokens 2048 --seqlen 256 --eval-tokens 4096 --eval-seqlen 512 \
  --task-limit 60 --option pgprune.steps=100 --option pgprune.batch_size=2 --option pgprune.heldout_windows=2 \
  --option pgprune.init_windows=6 --no-progress "$@"
