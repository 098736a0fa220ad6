import importlib.metadata

from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._implicit import implicit_hypergrad as implicit_hypergrad
from ._implicit_jvp import implicit_solution as implicit_solution
from ._inner_solve import inner_solve as inner_solve
from ._linearize import linearized_response as linearized_response
from ._neumann import Neumann as Neumann
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solvers import (
    AbstractInnerSolver as AbstractInnerSolver,
    GradientDescent as GradientDescent,
)
from ._unrolled import unrolled_hypergrad as unrolled_hypergrad


__version__ = importlib.metadata.version("bilevax")
