r"""Hyper-representation few-shot learning on Omniglot (Franceschi et al., ICML 2018).

The outer variable $\lambda$ is a conv net $h_\lambda$ (4 blocks of 3x3 conv with 64 filters,
batch norm with the episode's statistics, ReLU, 2x2 max-pool: 64 features) and the inner step
size $\eta$; the inner variable is a linear softmax head $w$, trained from zero by $T$ gradient
steps on an episode's support set. The meta-objective is the query cross-entropy of $w_T$,
differentiated in reverse mode through the $T$ steps (`bilevax.inner_solve` with
`bilevax.UnrolledAdjoint`), averaged over a meta-batch of episodes that is `jax.vmap`-ed and
sharded over all devices. Adam with a cosine schedule on $\lambda$; the model is selected on
meta-validation episodes and tested on 600 meta-test episodes and on Lake's 20 one-shot runs.

Other heads on the same backbone, episodes and budget (`--head`): the L2-regularised head
solved and differentiated implicitly, ProtoNet, and whole-network adaptation (MAML, first-order
MAML, iMAML; `_maml.py`).

    python -m experiments.hyper_representation [--quick] [--settings 5w1s 20w1s ...]
        [--head linear|implicit|prototypes|maml|fomaml|imaml]
        [--out DIR] [--data-dir DIR] [--seed S] [--resume]
"""

from ._data import (
    EpisodeStream as EpisodeStream,
    runs_batch as runs_batch,
    runs_character_ids as runs_character_ids,
    split_holding_out as split_holding_out,
)
from ._maml import (
    LINEAR_SOLVERS as LINEAR_SOLVERS,
    Adapted as Adapted,
    imaml_adapt as imaml_adapt,
    linear_solver as linear_solver,
    maml_adapt as maml_adapt,
)
from ._meta_step import (
    HEADS as HEADS,
    AdaptOptions as AdaptOptions,
    Batch as Batch,
    Head as Head,
    TrainState as TrainState,
    episode_accuracies as episode_accuracies,
    episode_loss as episode_loss,
    init_state as init_state,
    make_mesh as make_mesh,
    make_meta_step as make_meta_step,
    make_optimizer as make_optimizer,
    meta_step as meta_step,
    prototype_logits as prototype_logits,
    replicate as replicate,
    shard_batch as shard_batch,
    solve_head as solve_head,
    train_head as train_head,
)
from ._model import (
    ConvBlock as ConvBlock,
    ConvNet as ConvNet,
    HyperRepresentation as HyperRepresentation,
)
from ._run import SETTINGS as SETTINGS, main as main
