"""bilevax's solver in benchopt's `benchmark_bilevel` (experiments/benchmarks/benchopt/) runs
under benchopt at a tiny size and makes the benchmark's objective fall. benchopt and the
benchmark are not dependencies: the test needs `benchopt` installed and `BENCHMARK_BILEVEL`
naming a checkout of https://github.com/benchopt/benchmark_bilevel."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest


SOLVERS = pathlib.Path(__file__).parents[2] / "experiments" / "benchmarks" / "benchopt" / "solvers"


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver",
    ["bilevax_implicit[step_size_outer=0.1]", "bilevax_stochastic[eval_freq=16,batch_size=8]"],
)
def test_the_bilevax_solvers_run_in_benchopt_and_lower_the_objective(solver, tmp_path):
    pytest.importorskip("benchopt", reason="benchopt is not installed (pip install benchopt)")
    pd = pytest.importorskip("pandas")
    source = os.environ.get("BENCHMARK_BILEVEL")
    if not source or not pathlib.Path(source, "objective.py").is_file():
        pytest.skip("set BENCHMARK_BILEVEL to a checkout of benchopt/benchmark_bilevel")
    benchmark = tmp_path / "benchmark_bilevel"
    shutil.copytree(source, benchmark, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    for path in SOLVERS.glob("*.py"):
        shutil.copy(path, benchmark / "solvers")
    benchopt = pathlib.Path(sys.executable).parent / "benchopt"
    command = [
        str(benchopt),
        "run",
        str(benchmark),
        "-s",
        solver,
        "-d",
        "simulated[dim_inner=10,dim_outer=5,n_samples_inner=64,n_samples_outer=64]",
        "-n",
        "8",
        "-r",
        "1",
        "--timeout",
        "120",
        "--no-plot",
        "--output",
        "tiny",
    ]
    subprocess.run(command, check=True, cwd=benchmark, capture_output=True)
    results = pd.read_parquet(benchmark / "outputs" / "tiny.parquet")
    assert results["solver_name"].nunique() == (3 if "stochastic" in solver else 2)
    for _, run in results.groupby("solver_name"):
        values = run.sort_values("stop_val")["objective_value"].to_numpy()
        assert len(values) >= 5
        assert all(v == v for v in values)  # no NaN
        assert values[-1] < values[0]  # the benchmark's objective fell


def test_the_fair_clock_patch_waits_at_the_end_of_each_jax_loop(tmp_path):
    # `fair_clock.py` charges each step's work to the step: the wait must be the last line of
    # each patched `while callback():` body (not after it, where it would wait once), and the
    # patched files must still compile.
    source = os.environ.get("BENCHMARK_BILEVEL")
    if not source or not pathlib.Path(source, "objective.py").is_file():
        pytest.skip("set BENCHMARK_BILEVEL to a checkout of benchopt/benchmark_bilevel")
    sys.path.insert(0, str(SOLVERS.parent))
    try:
        import fair_clock
    finally:
        sys.path.remove(str(SOLVERS.parent))
    benchmark = tmp_path / "benchmark_bilevel"
    shutil.copytree(source, benchmark, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    fair_clock.patch(benchmark)
    for name in fair_clock.PATCHED:
        text = (benchmark / name).read_text()
        compile(text, name, "exec")
        body = text[text.index(fair_clock.LOOP) + len(fair_clock.LOOP) :].splitlines()
        loop = body[: body.index(fair_clock.WAIT.rstrip("\n")) + 1]
        assert all(line.startswith(" " * 12) for line in loop), name  # inside the loop
        following = next(line for line in body[len(loop) :] if line.strip())
        assert not following.startswith(" " * 12), name  # and its last line
