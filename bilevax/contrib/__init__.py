"""Algorithms built on the core primitives: HOAG's adaptive tolerances, a precision policy, the
single-loop stochastic bilevel solvers SOBA and SABA, and the first-order (Hessian-free)
methods F2SA and BOME."""

from ._first_order import BOME as BOME, F2SA as F2SA
from ._hoag import HOAG as HOAG, HOAGState as HOAGState
from ._precision import (
    PrecisionPolicy as PrecisionPolicy,
    mixed_precision_hypergrad as mixed_precision_hypergrad,
)
from ._stochastic import (
    SABA as SABA,
    SOBA as SOBA,
    AbstractStochasticBilevel as AbstractStochasticBilevel,
    Directions as Directions,
    StochasticState as StochasticState,
    stochastic_bilevel as stochastic_bilevel,
    stochastic_directions as stochastic_directions,
)
