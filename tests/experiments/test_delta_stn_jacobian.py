"""The Jacobian experiment (`experiments/delta_stn/jacobian.py`): its exact best-response
Jacobian against a dense solve, and each variant's learned Jacobian approaching the σ-secant
its objective targets as training lengthens."""

import jax
import numpy as np
import pytest

from experiments import problems
from experiments.delta_stn import jacobian


@pytest.fixture(scope="module")
def setup():
    train, _, _ = problems.diabetes(0)
    model = jacobian._model(4, jax.random.key(0))
    general = jacobian.converged_general(model, train)
    return train, model, general


def test_the_exact_jacobian_is_the_dense_solve(setup):
    train, _, general = setup
    implicit, dense = jacobian.exact_jacobian(general, train)
    assert jacobian.relerr(implicit, dense) < 1e-8
    assert np.linalg.norm(dense) > 1e-3  # the weights move with λ


@pytest.mark.parametrize("variant", ["delta", "centred"])
@pytest.mark.slow
def test_the_learned_jacobian_approaches_its_secant(setup, variant):
    train, model, general = setup
    implicit, _ = jacobian.exact_jacobian(general, train)
    sigma = 0.1
    target = jacobian.secant(variant, general, sigma, train, implicit)
    curve = jacobian.train_response(
        variant, model, general, sigma, train, 1500, jax.random.key(1), 500
    )
    errors = [jacobian.relerr(J, target) for J in curve]
    # R starts at 0 (error 1); it closes on the secant step by step.
    assert errors[0] > errors[1] > errors[2]
    assert errors[-1] < 0.6 * errors[0]
