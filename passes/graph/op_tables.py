"""Op tables: which modules, functions and methods the passes treat alike, as data.

Each table exists once here (in the manner of ``torch.ao.quantization.fx``'s pattern tables); the
passes read them and hold no op lists of their own. Functions are keyed by the callable
``torch.fx`` records as a ``call_function`` target, methods by their name.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

# --- arithmetic spellings ----------------------------------------------------------------------------
MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul, torch.multiply)
MUL_METHODS = ("mul", "mul_", "multiply", "multiply_")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
#: Python's augmented assignments and item assignment, which write into their left operand (recorded by the tracer)
INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)
ADD_METHODS = ("add", "add_")
#: ``torch.cat`` and its aliases
CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)

# --- layers ------------------------------------------------------------------------------------------
#: norms whose per-channel affine can take a scale on their output
NORM_MODULES = (_BatchNorm, nn.GroupNorm, _InstanceNorm, nn.LayerNorm, nn.RMSNorm)
#: plain BatchNorm classes (the BN-affine training form needs the class's own forward)
BATCH_NORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: functional conv / conv-transpose forms and their spatial rank
CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
CONV_TRANSPOSE_FUNCTIONS = {torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}
#: functional norms and the position of their ``weight`` argument (``bias`` follows it)
NORM_FUNCTION_WEIGHT_INDEX = {F.batch_norm: 3, F.instance_norm: 3, F.group_norm: 2, F.layer_norm: 2}

# --- dropout and other identities at inference -------------------------------------------------------
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: functional dropouts; each takes ``training`` as its third argument
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
DROPOUT_FUNCTION_NAMES = tuple(f.__name__ for f in DROPOUT_FUNCTIONS)
#: modules whose output equals their input at inference (walked through when looking for a producer)
IDENTITY_MODULES = (nn.Identity, *DROPOUT_MODULES)

# --- resampling: each output value is a per-channel mix of its input's values (a scale passes) -------
UPSAMPLE_MODULES = (nn.Upsample,)  # UpsamplingNearest2d and UpsamplingBilinear2d are subclasses
UPSAMPLE_FUNCTIONS = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)

# --- activations -------------------------------------------------------------------------------------
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh,
                      nn.SELU, nn.CELU, nn.PReLU)
ACTIVATION_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu,
                        F.elu, F.mish, F.hardtanh, F.selu, F.celu)
ACTIVATION_METHODS = ("relu", "relu_")

# --- ops a per-channel scale commutes with: (condition on the scale, trailing dims pooled) -----------
ANY_SCALE, NON_NEGATIVE_SCALE, UNIT_SCALE = "any scale", "scales >= 0", "a scale of exactly 1"
COMMUTING_MODULES: dict[type, tuple[str, int]] = {
    nn.Identity: (ANY_SCALE, 0), **{m: (ANY_SCALE, 0) for m in DROPOUT_MODULES},
    nn.AvgPool1d: (ANY_SCALE, 1), nn.AvgPool2d: (ANY_SCALE, 2), nn.AvgPool3d: (ANY_SCALE, 3),
    nn.AdaptiveAvgPool1d: (ANY_SCALE, 1), nn.AdaptiveAvgPool2d: (ANY_SCALE, 2), nn.AdaptiveAvgPool3d: (ANY_SCALE, 3),
    nn.ReLU: (NON_NEGATIVE_SCALE, 0), nn.LeakyReLU: (NON_NEGATIVE_SCALE, 0),
    nn.MaxPool1d: (NON_NEGATIVE_SCALE, 1), nn.MaxPool2d: (NON_NEGATIVE_SCALE, 2), nn.MaxPool3d: (NON_NEGATIVE_SCALE, 3),
    nn.AdaptiveMaxPool1d: (NON_NEGATIVE_SCALE, 1), nn.AdaptiveMaxPool2d: (NON_NEGATIVE_SCALE, 2),
    nn.AdaptiveMaxPool3d: (NON_NEGATIVE_SCALE, 3),
    nn.ReLU6: (UNIT_SCALE, 0), nn.Hardtanh: (UNIT_SCALE, 0),
}
COMMUTING_FUNCTIONS: dict[Any, tuple[str, int]] = {
    F.avg_pool1d: (ANY_SCALE, 1), F.avg_pool2d: (ANY_SCALE, 2), F.avg_pool3d: (ANY_SCALE, 3),
    F.adaptive_avg_pool1d: (ANY_SCALE, 1), F.adaptive_avg_pool2d: (ANY_SCALE, 2),
    F.adaptive_avg_pool3d: (ANY_SCALE, 3),
    F.relu: (NON_NEGATIVE_SCALE, 0), torch.relu: (NON_NEGATIVE_SCALE, 0), torch.relu_: (NON_NEGATIVE_SCALE, 0),
    F.leaky_relu: (NON_NEGATIVE_SCALE, 0),
    F.max_pool1d: (NON_NEGATIVE_SCALE, 1), F.max_pool2d: (NON_NEGATIVE_SCALE, 2), F.max_pool3d: (NON_NEGATIVE_SCALE, 3),
    F.adaptive_max_pool1d: (NON_NEGATIVE_SCALE, 1), F.adaptive_max_pool2d: (NON_NEGATIVE_SCALE, 2),
    F.adaptive_max_pool3d: (NON_NEGATIVE_SCALE, 3),
    F.relu6: (UNIT_SCALE, 0), F.hardtanh: (UNIT_SCALE, 0), torch.clamp: (UNIT_SCALE, 0), torch.clip: (UNIT_SCALE, 0),
}
COMMUTING_METHODS: dict[str, tuple[str, int]] = {
    "contiguous": (ANY_SCALE, 0), "clone": (ANY_SCALE, 0), "relu": (NON_NEGATIVE_SCALE, 0),
    "relu_": (NON_NEGATIVE_SCALE, 0), "clamp": (UNIT_SCALE, 0), "clip": (UNIT_SCALE, 0),
}
#: functional max pools whose ``return_indices`` is positional argument 6 (the others': 2)
MAX_POOL_INDICES_AT_6 = (F.max_pool1d, F.max_pool2d, F.max_pool3d)

# --- layout ops --------------------------------------------------------------------------------------
PERMUTE_TARGETS = (torch.permute, "permute")
TRANSPOSE_TARGETS = (torch.transpose, "transpose")
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
RESHAPE_TARGETS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view", "reshape",
                   "squeeze", "unsqueeze", "unflatten")

# --- views: the result shares (or may share) its input's storage: a write into one is seen through
# the other. ``to``/``float``/``type_as``... return their input itself when nothing changes -----------
VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                  torch.movedim, torch.t, torch.narrow, torch.select, torch.as_strided, torch.unflatten,
                  torch.swapaxes, torch.swapdims, torch.diagonal, operator.getitem)
VIEW_METHODS = ("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "movedim",
                "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "t", "narrow", "select", "as_strided",
                "swapaxes", "swapdims", "diagonal", "unfold", "detach", "view_as_real", "mT", "T",
                "to", "type", "type_as", "float", "double", "half", "bfloat16")

# --- uses that read only metadata --------------------------------------------------------------------
SHAPE_QUERY_METHODS = ("size", "dim", "numel", "ndimension")
#: ``getattr(x, name)`` reads that do not read the values
META_ATTRIBUTES = ("shape", "dtype", "device", "ndim")
#: ``c.expand_as(x)``, ``c.type_as(x)``, ``c.to(x.dtype)``: adapt a constant to the value it multiplies
ADAPTER_METHODS = ("expand_as", "type_as", "to")

# --- randomness (never constant-folded) --------------------------------------------------------------
RANDOM_FUNCTIONS = (torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
                    torch.randint_like, torch.bernoulli, torch.normal, torch.multinomial, torch.dropout,
                    *DROPOUT_FUNCTIONS)
RANDOM_METHODS = ("bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "cauchy_")

#: the torch layers whose forward the fold rules know; a subclass that overrides forward is not one of them
PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.RMSNorm,
                nn.MultiheadAttention)
