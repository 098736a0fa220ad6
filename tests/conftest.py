"""Shared by `tests/core` and `tests/experiments`: float64 and strict dtype promotion for every
test. A test that takes long is marked `@pytest.mark.slow` where it is defined (one case of a
parametrisation with `pytest.param(..., marks=pytest.mark.slow)`); `nox -s slow` runs those."""

import gc
import os

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


# Linux's default `vm.max_map_count` is 65,530; one test compiles at most a few thousand maps.
_MAX_MAPS = 40_000


def _memory_maps() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to keep under
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    # XLA's CPU backend maps memory for every program it compiles (3-6 maps each), and keeps
    # them while JAX's caches hold the program. A pytest-xdist worker runs hundreds of test
    # files in one process: in `nox -s slow` one reached Linux's limit of 65,530 maps and died
    # in XLA (a segfault or an abort while compiling or (de)serialising a program; one file
    # alone added ~25,000). After each test, the programs are dropped if the worker is near
    # the limit; not always, since tests share programs, and dropping them after every file
    # made the default run 25% slower.
    yield
    if _memory_maps() > _MAX_MAPS:
        jax.clear_caches()
        gc.collect()
