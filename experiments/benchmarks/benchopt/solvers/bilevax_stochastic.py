"""bilevax's single-loop stochastic solvers (`bx.contrib.SOBA`, `SABA`, `F2SA`) for benchopt's
`benchmark_bilevel`, on the benchmark's own oracles: a sample is an index into its data, and a
mini-batch loss is the mean of the per-sample losses `f(inner, outer, start=i, batch_size=1)`.

The step sizes follow the benchmark's solvers of the same name: SOBA's decrease as
`step_size / sqrt(t + 1)` (the outer one `outer_ratio` times smaller), SABA's are constant, and
F2SA's penalty grows linearly, `lmbda0 + delta_lmbda * t`. Each callback runs `eval_freq`
steps in one jitted `lax.scan` and waits for them (`jax.block_until_ready`), so that benchopt
times the work, not its dispatch.
"""

from benchopt import BaseSolver, safe_import_context
from benchopt.stopping_criterion import SufficientProgressCriterion


with safe_import_context() as import_ctx:
    import jax
    import jax.numpy as jnp
    from benchmark_utils import constants

    import bilevax as bx


class Solver(BaseSolver):
    """SOBA, SABA or F2SA from `bx.contrib`, driven by `bx.contrib.stochastic_bilevel`."""

    name = "bilevax_stochastic"

    requirements = []  # bilevax is installed from its checkout

    stopping_criterion = SufficientProgressCriterion(
        patience=constants.PATIENCE, strategy="callback"
    )

    parameters = {
        "method": ["SOBA", "SABA", "F2SA"],
        "step_size": [0.1],
        "outer_ratio": [1.0],
        "batch_size": [64],
        "eval_freq": [64],
        "lmbda0": [1.0],  # F2SA's penalty at step 0
        "delta_lmbda": [0.01],  # and its growth per step
        "random_state": [1],
    }

    @staticmethod
    def get_next(stop_val):
        return stop_val + 1

    def _solver(self):
        step, ratio = self.step_size, self.outer_ratio
        if self.method == "SOBA":
            decay = lambda lr: lambda t: lr / jnp.sqrt(t + 1.0)
            return bx.contrib.SOBA(
                decay(step), decay(step / ratio), self.batch_size, self.batch_size
            )
        if self.method == "SABA":
            return bx.contrib.SABA(step, step / ratio, self.batch_size, self.batch_size)
        if self.method == "F2SA":
            penalty = lambda t: self.lmbda0 + self.delta_lmbda * t
            return bx.contrib.F2SA(
                step,
                step / ratio,
                penalty,
                batch_size=self.batch_size,
                outer_batch_size=self.batch_size,
            )
        raise ValueError(f"`method` must be SOBA, SABA or F2SA, got {self.method!r}.")

    def set_objective(
        self, f_inner, f_outer, n_inner_samples, n_outer_samples, inner_var0, outer_var0
    ):
        def mean_of_samples(f):
            per_sample = lambda w, x, i: f(w, x, start=i, batch_size=1)
            return lambda w, x, idx: jnp.mean(jax.vmap(per_sample, (None, None, 0))(w, x, idx))

        self.inner_loss = mean_of_samples(f_inner)
        self.outer_loss = mean_of_samples(f_outer)
        self.inner_data = jnp.arange(n_inner_samples)
        self.outer_data = jnp.arange(n_outer_samples)
        self.solver = self._solver()
        self.key = jax.random.key(self.random_state)

        def steps(state):
            return bx.contrib.stochastic_bilevel(
                self.solver,
                self.outer_loss,
                self.inner_loss,
                None,
                None,
                self.inner_data,
                self.outer_data,
                num_steps=self.eval_freq,
                key=self.key,
                state=state,
            )

        self.steps = jax.jit(steps)
        self.inner_var0, self.outer_var0 = inner_var0, outer_var0
        self.run_once(2)  # compiles, outside the timed runs

    def run(self, callback):
        state = self.solver.init(
            self.outer_loss,
            self.inner_loss,
            self.inner_var0,
            self.outer_var0,
            self.inner_data,
            self.outer_data,
            key=self.key,
        )
        self.inner_var, self.outer_var = state.params, state.hparams
        while callback():
            state = jax.block_until_ready(self.steps(state))
            self.inner_var, self.outer_var = state.params, state.hparams

    def get_result(self):
        return dict(inner_var=self.inner_var, outer_var=self.outer_var)
