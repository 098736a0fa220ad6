"""bilevax against `benchmark_bilevel`'s own solvers on a fair clock: convergence curves of the
benchmark's objective and hypergradient norm against time.

benchopt times a solver's `run` between two callbacks. The benchmark's JAX solvers
(`jaxopt_GD`, and SOBA, SABA, ... through `StochasticJaxSolver`) never wait for JAX's
asynchronous dispatch there, so the work of each step is charged to the next evaluation of the
objective, which benchopt does not time: their curves show dispatch times. bilevax's solvers
wait. This script copies the benchmark, applies the one-line *fair-clock patch* to both of the
benchmark's JAX loops (`jax.block_until_ready` on the iterate before each callback: the
algorithms, objective and stopping rule are untouched), adds bilevax's solver files, runs
benchopt, and plots and tabulates the result. Run it in an environment with benchopt, jaxopt,
pandas, matplotlib and bilevax (see `README.md`):

    python experiments/benchmarks/benchopt/fair_clock.py --benchmark PATH/TO/benchmark_bilevel \\
        --out runs/benchopt-fair-clock [--quick]
"""

import argparse
import pathlib
import shutil
import subprocess
import sys


HERE = pathlib.Path(__file__).parent
# The benchmark's JAX solvers that `RUNS` uses, by the file that holds their `run` loop
# (SOBA's is `StochasticJaxSolver`'s, SABA has its own). Each loop's body gets, as its last
# line, a wait on the solver's attributes (its iterates among them); the loop is matched
# exactly, and a benchmark in which it is missing is refused rather than run unpatched.
PATCHED = [
    "solvers/jaxopt_gd.py",
    "solvers/saba.py",
    "benchmark_utils/stochastic_jax_solver.py",
]
LOOP = "        while callback():\n"
WAIT = "            jax.block_until_ready(vars(self))  # fair clock\n"
DATASET = "simulated[dim_inner=100,dim_outer=10,n_samples_inner=1024,n_samples_outer=1024]"
# (solvers, callbacks): the deterministic ones on the outer step the README uses (the
# solvers' default 10 diverges on this dataset, jaxopt_GD's too), then the stochastic ones.
RUNS = {
    "deterministic": (
        [
            "jaxopt_GD[inner_solver=lbfgs,step_size_outer=0.1]",
            "bilevax_implicit[step_size_outer=0.1,hoag=False]",
            "bilevax_implicit[step_size_outer=0.1,hoag=True]",
        ],
        30,
    ),
    "stochastic": (
        [
            "SOBA[eval_freq=128]",
            "SABA[eval_freq=128]",
            "bilevax_stochastic[eval_freq=128,method=SOBA]",
            "bilevax_stochastic[eval_freq=128,method=SABA]",
        ],
        20,
    ),
}


def patch(benchmark: pathlib.Path) -> None:
    """Adds the fair clock's wait to the benchmark's JAX loops, in place."""
    for name in PATCHED:
        path = benchmark / name
        text = path.read_text()
        if text.count(LOOP) != 1:
            raise SystemExit(f"{path}: expected one `{LOOP.strip()}`; the benchmark changed")
        # The wait goes at the end of the loop's body: before the next callback.
        end = _end_of_block(text, text.index(LOOP) + len(LOOP))
        text = text[:end] + WAIT + text[end:]
        if "import jax\n" not in text:
            text = "import jax\n" + text
        path.write_text(text)


def _end_of_block(text: str, start: int) -> int:
    """The offset just after the last non-blank line of the indented block at `start`."""
    lines = text[start:].splitlines(keepends=True)
    indent = len(lines[0]) - len(lines[0].lstrip())
    offset, end = start, start
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        offset += len(line)
        if line.strip():
            end = offset
    return end


def run(benchmark: pathlib.Path, name: str, solvers: list[str], callbacks: int) -> pathlib.Path:
    benchopt = pathlib.Path(sys.executable).parent / "benchopt"
    command = [str(benchopt), "run", str(benchmark), "-d", DATASET, "-n", str(callbacks)]
    for solver in solvers:
        command += ["-s", solver]
    command += ["-r", "1", "--timeout", "300", "--no-plot", "--output", name]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=benchmark)
    return benchmark / "outputs" / f"{name}.parquet"


def _short(solver: str) -> str:
    """A solver's name with only the parameters that tell `RUNS`' solvers apart."""
    name, _, rest = solver.partition("[")
    keep = [p for p in rest.rstrip("]").split(",") if p.split("=")[0] in ("hoag", "method")]
    return f"{name}[{','.join(keep)}]" if keep else name


def summarise(results, out: pathlib.Path, name: str) -> list[dict]:
    """Per solver: the time of its last callback, and its objective and hypergradient norm
    there and at the time the fastest solver finished; plots both curves against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    horizon = results.groupby("solver_name")["time"].max().min()
    for solver, curve in results.groupby("solver_name"):
        curve = curve.sort_values("time")
        time = curve["time"].to_numpy()
        func = curve["objective_func"].to_numpy()
        grad_norm = curve["objective_value"].to_numpy() ** 0.5  # the metric is ‖∇h‖²
        axes[0].plot(time, func, marker=".", label=_short(solver))
        axes[1].plot(time, grad_norm, marker=".", label=_short(solver))
        at = max(int((time <= horizon).sum()) - 1, 0)
        rows.append(
            {
                "solver": solver,
                "callbacks": len(time),
                "last_s": float(time[-1]),
                "objective_at_last": float(func[-1]),
                "hypergrad_norm_at_last": float(grad_norm[-1]),
                "horizon_s": float(horizon),
                "objective_at_horizon": float(func[at]),
                "hypergrad_norm_at_horizon": float(grad_norm[at]),
            }
        )
    # The outer objective can be negative: a linear axis; the hypergradient norm on a log one.
    for ax, label, scale in zip(axes, ["outer objective at the inner solution", "‖∇h‖"], "lL"):
        ax.set_xscale("log")
        ax.set_yscale("log" if scale == "L" else "linear")
        ax.set_xlabel("time (s), fair clock")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"benchmark_bilevel, {DATASET} ({name})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    return rows


def main(argv=None) -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--benchmark", type=pathlib.Path, required=True)
    cli.add_argument("--out", type=pathlib.Path, required=True)
    cli.add_argument("--quick", action="store_true", help="a third of the callbacks")
    args = cli.parse_args(argv)
    if not (args.benchmark / "objective.py").is_file():
        cli.error(f"--benchmark: {args.benchmark} is not a checkout of benchmark_bilevel")
    if args.out.exists():
        cli.error(f"--out: {args.out} exists; choose a new folder")
    import json

    import pandas as pd

    work = args.out / "benchmark_bilevel"
    shutil.copytree(args.benchmark, work, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    patch(work)
    for path in (HERE / "solvers").glob("*.py"):
        shutil.copy(path, work / "solvers")
    summary = {}
    for name, (solvers, callbacks) in RUNS.items():
        callbacks = max(callbacks // 3, 5) if args.quick else callbacks
        results = pd.read_parquet(run(work, name, solvers, callbacks))
        summary[name] = summarise(results, args.out, name)
        for row in summary[name]:
            print(json.dumps(row), flush=True)
    (args.out / "fair_clock.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/fair_clock.json and the figures there")


if __name__ == "__main__":
    main()
