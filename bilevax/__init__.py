import importlib.metadata as _metadata

from . import nn as nn
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._cg import CG as CG
from ._hoag import HOAG as HOAG, HOAGState as HOAGState
from ._hypergrad_info import (
    HypergradInfo as HypergradInfo,
    HypergradResult as HypergradResult,
)
from ._implicit import implicit_hypergrad as implicit_hypergrad
from ._implicit_jvp import (
    implicit_diff as implicit_diff,
    implicit_solution as implicit_solution,
)
from ._inner_solve import inner_solve as inner_solve
from ._linearize import linearized_response as linearized_response
from ._neumann import Neumann as Neumann
from ._precision import (
    PrecisionPolicy as PrecisionPolicy,
    mixed_precision_hypergrad as mixed_precision_hypergrad,
)
from ._preconditioner import (
    AbstractPreconditioner as AbstractPreconditioner,
    Damped as Damped,
    JacobiPreconditioner as JacobiPreconditioner,
)
from ._prox import (
    prox_elastic_net as prox_elastic_net,
    prox_group_lasso as prox_group_lasso,
    prox_lasso as prox_lasso,
)
from ._proximal import ProjectedGradient as ProjectedGradient, ProximalGradient as ProximalGradient
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solvers import (
    AbstractInnerSolver as AbstractInnerSolver,
    GradientDescent as GradientDescent,
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
from ._unrolled import unrolled_hypergrad as unrolled_hypergrad


__version__ = _metadata.version("bilevax")
