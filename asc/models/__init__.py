"""Models for log-mel inputs shaped (batch, 1, frequency, time), returning logits (batch, classes)."""

from asc.models.baseline import DCASE2021Baseline, keras_param_count
from asc.models.bcresnet import BCResBlock, BCResNet, BCResNetMod
from asc.models.cpmobile import CPMobile, CPMobileBlock, make_divisible
from asc.models.norms import (
    FreqNorm,
    InstanceFreqNorm,
    NormFactory,
    RelaxedFreqNorm,
    ResNorm,
    SubSpectralNorm,
    freq_norm,
    norm_factory,
    norm_names,
)
from asc.models.registry import build_model, model_names, model_options

__all__ = [
    "BCResBlock",
    "BCResNet",
    "BCResNetMod",
    "CPMobile",
    "CPMobileBlock",
    "DCASE2021Baseline",
    "FreqNorm",
    "InstanceFreqNorm",
    "NormFactory",
    "RelaxedFreqNorm",
    "ResNorm",
    "SubSpectralNorm",
    "build_model",
    "freq_norm",
    "keras_param_count",
    "make_divisible",
    "model_names",
    "model_options",
    "norm_factory",
    "norm_names",
]
