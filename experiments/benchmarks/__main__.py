"""`python -m experiments.benchmarks [--quick] [--out DIR] [--overwrite]`: every benchmark in
`BENCHMARKS`, one after another, with the same arguments (`nox -s bench` passes `--quick`), into
one output directory (a new `runs/benchmarks-<date>-<time>` unless `--out`)."""

import importlib
import sys
import time

from .. import _cli, _harness
from ._timing import parser


# Module names under `experiments.benchmarks`; each has `main(argv)`.
BENCHMARKS = [
    "accuracy",
    "implicit_vs_jaxopt",
    "compile_time",
    "ho_loop",  # whole outer loops, jaxopt against bilevax: ~2 min with --quick on 2 cores
    "krylov_recycling",  # a bound for ho_loop's adjoint solves: ~1 min
    "unrolled_memory",
    "forward_vs_reverse",
    "against_torch",
    "task_batching",
    "hyper_representation_step",
    "delta_stn_step",
    "weak_scaling",  # launches 1, 2, 4 loopback processes: ~1.5 min with --quick on 2 cores
]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser("", "run every benchmark").parse_args(argv)  # validates; --help lists them
    if args.out is None:  # one new directory for all of them
        argv = [*argv, "--out", str(_harness.claim_outputs(args, []))]
    for name in BENCHMARKS:
        print(f"== experiments.benchmarks.{name} ==", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"experiments.benchmarks.{name}").main(argv)
        print(f"== {name}: {time.perf_counter() - start:.0f} s ==\n", flush=True)


if __name__ == "__main__":
    _cli.cli(main)
