"""Small Cells shared by every model family. Parameter names follow PyTorch (``weight``/``bias``) so that checkpoints
map by identity; the arithmetic is in ``backend``."""

import numpy as np

from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import Normal, initializer

from .. import backend


def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Dense:
    """``nn.Dense`` with a torch-layout (out, in) weight; initial values come from a checkpoint or training init."""
    return nn.Dense(in_dim, out_dim, has_bias=bias, weight_init="xavier_uniform", bias_init="zeros")


def zero_linear(in_dim: int, out_dim: int) -> nn.Dense:
    """A linear that starts at zero (adaLN, gates and output layers of the DiTs: the block starts as the identity)."""
    return nn.Dense(in_dim, out_dim, weight_init="zeros", bias_init="zeros")


def normal_parameter(shape: tuple, std: float = 0.02) -> Parameter:
    return Parameter(initializer(Normal(sigma=std), shape))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with optional affine ``weight``/``bias`` (statistics in fp32); ``construct(x,
    scale=None, shift=None)`` with an adaLN modulation (B, D) of (B, L, D) tokens: ``norm(x) * scale + shift``."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.affine = affine
        self.fused, self.compiled_kernel = backend.use_fused_kernels(), backend.compiled_kernels()
        if affine:
            self.weight = Parameter(Tensor(np.ones(dim, np.float32)))
            self.bias = Parameter(Tensor(np.zeros(dim, np.float32)))

    def construct(self, x, scale=None, shift=None):
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return backend.layer_norm(x, weight, bias, self.eps, self.fused, self.compiled_kernel, scale, shift)


class RMSNorm(nn.Cell):
    """RMSNorm in fp32. LLaMA form: ``norm(x.float()).type_as(x) * weight``; with ``offset`` (Gemma) the scale is
    ``1 + weight`` and the product is also taken in fp32 before the cast. ``construct(x, scale=None, shift=None)``:
    as ``LayerNorm`` (LLaMA form only)."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.fused = backend.use_fused_kernels() and not offset
        self.compiled_kernel = backend.compiled_kernels()
        self.weight = Parameter(Tensor(np.full(dim, 0.0 if offset else 1.0, np.float32)))  # identity scale

    def construct(self, x, scale=None, shift=None):
        if self.offset:
            return backend.rms_norm_offset(x, self.weight, self.eps, self.compiled_kernel)
        return backend.rms_norm(x, self.weight, self.eps, self.fused, self.compiled_kernel, scale, shift)


def cast_parameters(cell: nn.Cell, dtype) -> nn.Cell:
    """Store every parameter of ``cell`` in ``dtype`` (the model then computes in that dtype)."""
    backend.check_dtype_supported(dtype)
    for p in cell.get_parameters():
        if p.dtype != dtype:
            p.set_dtype(dtype)
    return cell


def parameter_count(cell: nn.Cell) -> int:
    return int(sum(np.prod(p.shape) for p in cell.get_parameters()))
