from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree

from .._checks import check_int, check_real
from .._misc import tree_norm


class Neumann(lx.AbstractLinearSolver):
    r"""Truncated Neumann series, a `lineax` solver for $A x = b$:

    $$x \approx \alpha \sum_{k=0}^{K} (I - \alpha A)^k b.$$

    It converges when the spectrum of $\alpha A$ lies in $(0, 2)$; with few steps it acts as
    a cheap, biased approximation of $A^{-1}$ (Lorraine et al. 2020), whose error decays as
    $|1 - \alpha \mu|^{K+1}$ for each eigenvalue $\mu$ of $A$. It uses $K$ matrix-vector
    products. It is approximate by design, so a short series is not a failure; a series
    that does not converge is reported as `lx.RESULTS.breakdown`: one whose last two terms
    show a spectral radius $\rho(I - \alpha A) \ge 1$ (the ratio
    $\|(I - \alpha A)^K b\| / \|(I - \alpha A)^{K-1} b\|$, the power method's lower bound on
    $\rho$, is at least 1), or whose last term is larger than its first. Non-finite values
    are a failure by the caller's policy.

    **Arguments:**

    - `steps`: the number of terms $K$ after the first.
    - `scale`: the step $\alpha$; pick it below $2 / \lambda_{\max}(A)$.
    """

    steps: int
    scale: ArrayLike = 1.0

    def __check_init__(self):
        check_int("steps", self.steps, 0)
        # α ≤ 0 never converges (the series' terms do not shrink).
        check_real("scale", self.scale, lower=0, lower_open=True)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if operator.in_structure() != operator.out_structure():
            raise ValueError("`Neumann` needs a square operator (in structure == out structure).")
        return lx.linearise(operator)

    def compute(
        self, state: lx.AbstractLinearOperator, vector: PyTree[Array], options: dict[str, Any]
    ):
        del options
        operator = state

        def term(carry, _):
            power, total, _ = carry
            previous_norm = tree_norm(power)
            power = jax.tree.map(lambda p, ap: p - self.scale * ap, power, operator.mv(power))
            total = jax.tree.map(lambda t, p: t + p, total, power)
            return (power, total, previous_norm), None

        norm = tree_norm(vector)
        (power, total, previous_norm), _ = jax.lax.scan(
            term, (vector, vector, norm), length=self.steps
        )
        solution = jax.tree.map(lambda t: self.scale * t, total)
        # The series converges only if the spectral radius of M = I − αA is below 1. The ratio
        # of the last two terms, ‖Mᵏb‖ / ‖Mᵏ⁻¹b‖, is a lower bound on it that grows with k
        # (for a symmetric A; it is the power method): a ratio of 1 or more shows a series
        # that does not converge however many terms it is given (α ≤ 0 among them), even
        # while its last term is still below ‖b‖. An exactly zero term is an exact answer.
        last_norm = tree_norm(power)
        ratio = last_norm / jnp.where(previous_norm > 0, previous_norm, 1)
        stalled = (ratio >= 1) & (last_norm > 0) & (self.steps > 0)
        diverged = stalled | (last_norm > norm)
        result = lx.RESULTS.where(diverged, lx.RESULTS.breakdown, lx.RESULTS.successful)
        return solution, result, {"num_steps": self.steps}

    def transpose(self, state: lx.AbstractLinearOperator, options: dict[str, Any]):
        return state.transpose(), options

    def conj(self, state: lx.AbstractLinearOperator, options: dict[str, Any]):
        return lx.conj(state), options

    def assume_full_rank(self) -> bool:
        return True
