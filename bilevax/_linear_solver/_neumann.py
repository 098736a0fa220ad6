from typing import Any

import jax
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree

from .._misc import tree_norm


class Neumann(lx.AbstractLinearSolver):
    r"""Truncated Neumann series, a `lineax` solver for $A x = b$:

    $$x \approx \alpha \sum_{k=0}^{K} (I - \alpha A)^k b.$$

    It converges when the spectrum of $\alpha A$ lies in $(0, 2)$; with few steps it acts as
    a cheap, biased approximation of $A^{-1}$ (Lorraine et al. 2020), whose error decays as
    $|1 - \alpha \mu|^{K+1}$ for each eigenvalue $\mu$ of $A$. It uses $K$ matrix-vector
    products. It is approximate by design, so a short series is not a failure; a series
    that diverges (its last term larger than its first, $\|(I - \alpha A)^K b\| > \|b\|$,
    which a convergent series never has for a symmetric $A$) is reported as
    `lx.RESULTS.breakdown`, and non-finite values as a failure by the caller's policy.

    **Arguments:**

    - `steps`: the number of terms $K$ after the first.
    - `scale`: the step $\alpha$; pick it below $2 / \lambda_{\max}(A)$.
    """

    steps: int
    scale: ArrayLike = 1.0

    def __check_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"`steps` must be a non-negative int, got {self.steps!r}.")

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
            power, total = carry
            power = jax.tree.map(lambda p, ap: p - self.scale * ap, power, operator.mv(power))
            return (power, jax.tree.map(lambda t, p: t + p, total, power)), None

        (power, total), _ = jax.lax.scan(term, (vector, vector), length=self.steps)
        solution = jax.tree.map(lambda t: self.scale * t, total)
        diverged = tree_norm(power) > tree_norm(vector)
        result = lx.RESULTS.where(diverged, lx.RESULTS.breakdown, lx.RESULTS.successful)
        return solution, result, {"num_steps": self.steps}

    def transpose(self, state: lx.AbstractLinearOperator, options: dict[str, Any]):
        return state.transpose(), options

    def conj(self, state: lx.AbstractLinearOperator, options: dict[str, Any]):
        return lx.conj(state), options

    def assume_full_rank(self) -> bool:
        return True
