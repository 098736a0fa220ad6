"""Shared by `tests/core` and `tests/experiments`: float64 and strict dtype promotion for every
test. A test that takes long is marked `@pytest.mark.slow` where it is defined (one case of a
parametrisation with `pytest.param(..., marks=pytest.mark.slow)`); `nox -s slow` runs those."""

import jax
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _restore_precision():
    # Experiments that train in float32 switch `jax_enable_x64` off for the whole process;
    # every test starts from the suite's float64, whatever ran before it.
    yield
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
