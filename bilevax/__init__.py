import importlib as _importlib
import typing as _typing

from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._approximate import (
    AbstractApproximateAdjoint as AbstractApproximateAdjoint,
    FiniteDifferenceAdjoint as FiniteDifferenceAdjoint,
    OneStepAdjoint as OneStepAdjoint,
    SAMAAdjoint as SAMAAdjoint,
)
from ._custom_types import InnerLoss as InnerLoss, OuterLoss as OuterLoss
from ._implicit import implicit_hypergrad as implicit_hypergrad
from ._implicit_diff import implicit_diff as implicit_diff
from ._inner_solve import inner_solve as inner_solve
from ._kkt import KKTOptimality as KKTOptimality, kkt_optimality as kkt_optimality
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
from ._solver._qp import QPSolution as QPSolution, solve_qp as solve_qp
from ._unrolled import unrolled_hypergrad as unrolled_hypergrad


if _typing.TYPE_CHECKING:
    from . import contrib as contrib, diagnostics as diagnostics, nn as nn

    __version__: str

# The optional layers on the core (`bx.contrib`, `bx.diagnostics`, `bx.nn`) are imported on
# first use, as is the version (`importlib.metadata` is slow to import): `import bilevax`
# loads only what the primitives need.
_SUBMODULES = ("contrib", "diagnostics", "nn")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # sets it on the package too
    if name == "__version__":
        import importlib.metadata

        version = importlib.metadata.version("bilevax")
        globals()["__version__"] = version
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, "__version__"})
