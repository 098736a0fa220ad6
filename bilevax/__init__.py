import importlib.metadata as _metadata

from . import contrib as contrib, diagnostics as diagnostics, nn as nn
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._custom_types import InnerLoss as InnerLoss, OuterLoss as OuterLoss
from ._implicit import implicit_hypergrad as implicit_hypergrad
from ._implicit_diff import implicit_diff as implicit_diff
from ._inner_solve import inner_solve as inner_solve
from ._linear_solver import (
    CG as CG,
    AbstractPreconditioner as AbstractPreconditioner,
    Damped as Damped,
    JacobiPreconditioner as JacobiPreconditioner,
    Neumann as Neumann,
    Preconditioned as Preconditioned,
    QuasiNewtonPreconditioner as QuasiNewtonPreconditioner,
)
from ._linearize import linearized_response as linearized_response
from ._solution import (
    RESULTS as RESULTS,
    HypergradInfo as HypergradInfo,
    Solution as Solution,
)
from ._solver import (
    AbstractInnerSolver as AbstractInnerSolver,
    GradientDescent as GradientDescent,
    ProjectedGradient as ProjectedGradient,
    ProximalGradient as ProximalGradient,
    prox_elastic_net as prox_elastic_net,
    prox_group_lasso as prox_group_lasso,
    prox_lasso as prox_lasso,
)
from ._unrolled import unrolled_hypergrad as unrolled_hypergrad


__version__ = _metadata.version("bilevax")
