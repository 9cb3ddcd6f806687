"""ganspect's benchmarks: speed, memory and accuracy measured side by side, against the limits.

`python -m benchmarks [--quick] [--out benchmarks/RESULTS.md]` writes one Markdown file
with the machine, the versions, and every figure as a median and a p99 over its runs,
each target stated with met / missed / not measured. See `benchmarks/README.md`.

The `bench_*` modules hold the measurements; the seed experiments (`paper_mnist.py`,
`seed*.py`, their `results/`) are the trainer's and run as scripts of their own.
"""
