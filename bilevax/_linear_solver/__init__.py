from ._cg import CG as CG
from ._neumann import Neumann as Neumann
from ._preconditioner import (
    AbstractPreconditioner as AbstractPreconditioner,
    Damped as Damped,
    JacobiPreconditioner as JacobiPreconditioner,
    Preconditioned as Preconditioned,
    QuasiNewtonPreconditioner as QuasiNewtonPreconditioner,
)
