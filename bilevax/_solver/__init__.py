from ._base import (
    AbstractInnerSolver as AbstractInnerSolver,
    GradientDescent as GradientDescent,
    Loss as Loss,
    SolverLike as SolverLike,
    as_inner_solver as as_inner_solver,
    check_solver as check_solver,
)
from ._prox import (
    prox_elastic_net as prox_elastic_net,
    prox_group_lasso as prox_group_lasso,
    prox_lasso as prox_lasso,
)
from ._proximal import ProjectedGradient as ProjectedGradient, ProximalGradient as ProximalGradient
