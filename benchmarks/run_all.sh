#!/usr/bin/env bash
# Start the seeds' experiments in the background, niced, as two chains (about two CPU
# cores in all). Every script is resumable: run this again after an interruption and
# finished units are skipped, half-trained models resume from their checkpoints.
# Results: benchmarks/results/*.md (+ .json, .png); logs: benchmarks/logs/*.log;
# run folders (checkpoints, not committed): benchmarks/runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p benchmarks/logs
nohup nice -n 10 bash -c "$PY benchmarks/seed000_lambda.py && $PY benchmarks/seed003_anogan.py && $PY benchmarks/elpv.py" \
    > benchmarks/logs/chain_seeds_elpv.log 2>&1 &
echo "chain seed000 -> seed003 -> elpv: pid $! (log benchmarks/logs/chain_seeds_elpv.log)"
nohup nice -n 10 bash -c "$PY benchmarks/paper_mnist.py && $PY benchmarks/ocnn_mnist.py" > benchmarks/logs/paper_mnist.log 2>&1 &
echo "chain paper_mnist -> ocnn_mnist: pid $! (log benchmarks/logs/paper_mnist.log)"
