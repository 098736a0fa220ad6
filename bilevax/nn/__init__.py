"""Equinox modules for self-tuning networks (STN, centred STN, Δ-STN)."""

from ._backbones import (
    StnCNN as StnCNN,
    StnMLP as StnMLP,
    cutout as cutout,
    dropout as dropout,
)
from ._hyperparameters import Hyperparameter as Hyperparameter, HyperParameters as HyperParameters
from ._stn import (
    VARIANTS as VARIANTS,
    eval_input as eval_input,
    hyper_loss as hyper_loss,
    predict as predict,
    weight_grads as weight_grads,
)
from ._stn_layers import (
    StnConv2d as StnConv2d,
    StnLinear as StnLinear,
    response_filter as response_filter,
    split_weights as split_weights,
)
