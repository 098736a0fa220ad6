"""Benchmarks against peers: `python -m experiments.benchmarks [--quick] [--out DIR]` runs them
all; `python -m experiments.benchmarks.<name>` runs one. Each reports speed as ratios measured in
one run, and writes `<name>.json` (with its configuration, versions and devices) and
`<name>.png` to `--out` (default: a new `runs/benchmarks-<date>-<time>`), refusing to replace
them there unless `--overwrite`."""
