"""`experiments.meta_ho` in one process: resuming counts the meta-steps it runs (none for a
finished run, the rest for a killed one, the new ones for more `--steps`) and ends where an
uninterrupted run ends; other options are refused. (Several processes: `test_distributed.py`.)"""

import re

import numpy as np
import pytest

from experiments import _harness, meta_ho


ARGS = ["--meta-batch", "2", "--test-tasks", "4", "--method", "unrolled", "--unrolled-steps", "5"]


@pytest.fixture
def calls(monkeypatch):
    """The meta-steps run, counted; `calls.fail_at = k` "kills" the run at meta-step k."""

    class Calls(list):
        fail_at = None

    calls = Calls()
    make_meta_step = meta_ho.make_meta_step

    def counting(*args):
        step, opt = make_meta_step(*args)

        def spy(*step_args):
            if len(calls) == calls.fail_at:
                raise KeyboardInterrupt
            calls.append(1)
            return step(*step_args)

        return spy, opt

    monkeypatch.setattr(meta_ho, "make_meta_step", counting)
    return calls


@pytest.mark.slow
def test_resume_runs_only_the_meta_steps_left(tmp_path, calls):
    main = lambda out, steps, *argv: meta_ho.main(
        [*ARGS, "--steps", str(steps), "--out", str(tmp_path / out), *argv]
    )
    whole = main("whole", 4)
    calls.clear()
    calls.fail_at = 2
    with pytest.raises(KeyboardInterrupt):
        main("cut", 3)
    calls.clear()
    calls.fail_at = None
    resumed = main("cut", 3, "--resume")
    assert len(calls) == 1 and resumed["run"]["progress"]["meta_ho"] == {"from": 2, "to": 3}
    calls.clear()
    assert main("cut", 3, "--resume")["run"]["progress"]["meta_ho"] == {"from": 3, "to": 3}
    assert calls == []
    # More --steps continue the run, which then is the 4-step run.
    grown = main("cut", 4, "--resume")
    assert len(calls) == 1
    np.testing.assert_array_equal(grown["log_lam"], whole["log_lam"])
    assert grown["history"]["val_loss"] == whole["history"]["val_loss"]
    with pytest.raises(_harness.RunError, match=re.escape("--steps: 4 in the saved run, 3 now")):
        main("cut", 3, "--resume")
    with pytest.raises(_harness.RunError, match=re.escape("--lr: 0.1 in the saved run, 0.2 now")):
        main("cut", 4, "--resume", "--lr", "0.2")
