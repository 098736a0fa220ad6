from ._cg import CG as CG
from ._neumann import Neumann as Neumann
from ._preconditioner import (
    AbstractPreconditioner as AbstractPreconditioner,
    Damped as Damped,
    JacobiPreconditioner as JacobiPreconditioner,
    Preconditioned as Preconditioned,
    default_linear_solver as default_linear_solver,
)
