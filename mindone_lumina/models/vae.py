"""The SDXL VAE (diffusers ``AutoencoderKL``) in MindSpore: encoder, decoder, posterior, tiled decoding, loading.

Ported from diffusers 0.35.2 ``models/autoencoders/{autoencoder_kl,vae}.py``, ``models/resnet.py``,
``models/{upsampling,downsampling}.py`` and ``models/unets/unet_2d_blocks.py`` (Apache-2.0, the HuggingFace team).
Parameter names are the diffusers names, so checkpoints load by identity. Deviations, all deliberate:

* Only the ``AutoencoderKL`` used by SD/SDXL: ``DownEncoderBlock2D``/``UpDecoderBlock2D``, SiLU, GroupNorm; no spatial
  norm, no gradient checkpointing, no tiled *encoding*, no slicing (the batch is decoded in one call).
* GroupNorm statistics and the attention softmax run in fp32 whatever the parameter dtype.
* Convolutions go through ``convolution.conv2d`` with the kernel ``convolution.conv_kernel`` chose: the framework
  kernel on Ascend, oneDNN custom ops or MindSpore's kernel or per-tap matmuls on CPU; the results agree to fp32
  rounding.
* Tiled decoding places equal-size tiles evenly over the latent (one compiled shape) and blends every overlap with
  linear weights that sum to one; diffusers' ``tiled_decode`` uses ragged edge tiles and crops. The two agree with the
  untiled decode to a similar degree, not with each other.

Latent convention (spec section 5): the denoiser works on ``scaling_factor * (mean - shift_factor)``;
``latents_to_images`` decodes ``z / scaling_factor + shift_factor``.
"""

import math
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from .. import backend, convolution
from .layers import linear


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAEConfig:
    """The ``AutoencoderKL`` config fields that shape the network or the latent space (diffusers names)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD/SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS = {
    # stabilityai/sdxl-vae, the decoder of Lumina-Next (spec section 5)
    "sdxl-vae": VAEConfig(),
}


@dataclass(frozen=True)
class Tiling:
    """Tiled decoding: equal tiles of at most ``tile`` latent pixels a side; neighbours share at least
    ``overlap * tile`` latent pixels, across which they are blended linearly."""

    tile: int = 64
    overlap: float = 0.25

    def __post_init__(self):
        if self.tile < 2:
            raise ValueError(f"tile must be at least 2 latent pixels, got {self.tile}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------
class Conv2d(nn.Cell):
    """torch ``Conv2d`` (square kernel, zero padding) with torch's parameter layout, computed by
    ``convolution.conv2d``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        shape = (out_ch, in_ch, kernel, kernel)
        self.weight = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)), shape, ms.float32))  # torch's
        self.bias = Parameter(initializer("zeros", (out_ch,), ms.float32))
        self.stride, self.padding = stride, padding
        self.kernel = convolution.conv_kernel()

    def construct(self, x):
        return convolution.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.kernel)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> Conv2d:
    """A "same" conv; a stride-2 conv gets its (asymmetric) padding from ``Downsample2D`` instead."""
    return Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2 if stride == 1 else 0)


class GroupNorm(nn.Cell):
    """torch ``GroupNorm`` with fp32 statistics and affine (torch also computes half-precision GroupNorm in fp32);
    ``construct(x, silu=False)``: then SiLU, in the same kernel where the backend can."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = Parameter(Tensor(np.ones(channels, np.float32)))
        self.bias = Parameter(Tensor(np.zeros(channels, np.float32)))
        self.compiled_kernel = backend.compiled_kernels()

    def construct(self, x, silu: bool = False):
        return backend.group_norm(x, self.groups, self.weight, self.bias, self.eps, self.compiled_kernel, silu)


class ResnetBlock2D(nn.Cell):
    """(GroupNorm, SiLU, conv3x3) twice plus the input, through a 1x1 conv when the width changes; no time embedding."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = _conv(in_ch, out_ch, 3)
        self.norm2 = GroupNorm(groups, out_ch)
        self.conv2 = _conv(out_ch, out_ch, 3)
        self.use_shortcut = in_ch != out_ch
        if self.use_shortcut:
            self.conv_shortcut = _conv(in_ch, out_ch, 1)

    def construct(self, x):
        h = self.conv1(self.norm1(x, True))  # (B, C_out, H, W); the norm with its SiLU
        h = self.conv2(self.norm2(h, True))
        if self.use_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class Attention2D(nn.Cell):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual (the VAE mid-block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = linear(channels, channels)
        self.to_k = linear(channels, channels)
        self.to_v = linear(channels, channels)
        self.to_out = nn.CellList([linear(channels, channels)])  # diffusers' to_out.1 is a dropout
        self.scale = 1.0 / math.sqrt(channels)
        self.fused, self.compiled_kernel = backend.use_fused_kernels(), backend.compiled_kernels()

    def construct(self, x):
        b, c, h, w = x.shape
        # ops.transpose (a copy), not the view mint.permute: MindSpore's CPU kernels read a strided view slowly
        # (backend.attention); here its reshapes each paid a strided copy
        t = ops.transpose(self.group_norm(x).reshape(b, c, h * w), (0, 2, 1))  # (B, HW, C)
        q = self.to_q(t).reshape(b, h * w, 1, c)  # (B, HW, 1, C)
        k = self.to_k(t).reshape(b, h * w, 1, c)
        v = self.to_v(t).reshape(b, h * w, 1, c)
        out = backend.attention(q, k, v, None, self.scale, self.fused, compiled=self.compiled_kernel)  # (B, HW, 1, C)
        out = out.reshape(b, h * w, c)  # (B, HW, C)
        out = ops.transpose(self.to_out[0](out), (0, 2, 1)).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (as the SD VAE was trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.conv(convolution.pad2d(x, 0, 1, 0, 1))  # (B, C, H/2, W/2)


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def construct(self, x):
        _, _, h, w = x.shape
        return self.conv(mint.nn.functional.interpolate(x, size=(2 * h, 2 * w), mode="nearest"))  # (B, C, 2H, 2W)


class ResnetStack(nn.Cell):
    """ResnetBlock2Ds, then a x2 resampler: diffusers' ``DownEncoderBlock2D`` (``resample`` "down", a stride-2 conv in
    ``downsamplers``) or ``UpDecoderBlock2D`` ("up", nearest x2 and a conv in ``upsamplers``); None: last level."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.CellList([Downsample2D(out_ch)])
        elif resample == "up":
            self.upsamplers = nn.CellList([Upsample2D(out_ch)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """resnet, (attention), resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.add_attention = add_attention
        if add_attention:
            self.attentions = nn.CellList([Attention2D(channels, groups)])

    def construct(self, x):
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Cell):
    """(B, in_channels, H, W) image in [-1, 1] -> (B, 2 * latent_channels, H/f, W/f) posterior moments."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups, levels = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = _conv(cfg.in_channels, chs[0], 3)
        self.down_blocks = nn.CellList(
            [
                ResnetStack(
                    chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, groups, "down" if i < levels - 1 else None
                )
                for i in range(levels)
            ]
        )
        self.mid_block = UNetMidBlock2D(chs[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chs[-1])
        self.conv_out = _conv(chs[-1], 2 * cfg.latent_channels, 3)

    def construct(self, x):
        x = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(self.conv_norm_out(x, True))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Cell):
    """(B, latent_channels, h, w) latent (already divided by the scaling factor) -> (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups, levels = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = _conv(cfg.latent_channels, chs[0], 3)
        self.mid_block = UNetMidBlock2D(chs[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.CellList(
            [
                ResnetStack(
                    chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, groups, "up" if i < levels - 1 else None
                )
                for i in range(levels)
            ]
        )
        self.conv_norm_out = GroupNorm(groups, chs[-1])
        self.conv_out = _conv(chs[-1], cfg.out_channels, 3)

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, True))  # (B, out_channels, h*f, w*f)


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) from encoder moments (B, 2C, h, w); logvar clamped to [-30, 20]."""

    def __init__(self, moments):
        self.mean, logvar = mint.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        self.logvar = mint.clamp(logvar, -30.0, 20.0)
        self.std = mint.exp(0.5 * self.logvar)

    def sample(self, seed: int = 0):
        """mean + std * eps with eps drawn on the host by numpy (``mint.randn`` has no CPU kernel)."""
        eps = np.random.default_rng(seed).standard_normal(self.mean.shape, dtype=np.float32)
        return self.mean + self.std * Tensor(eps, dtype=self.mean.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------
class AutoencoderKL(nn.Cell):
    """``encode(x) -> DiagonalGaussian`` and ``decode(z, tiling=None) -> image``, computing in the parameter dtype.

    The encoder and decoder are separate Cells, each compiled once per input shape in graph mode; tiled decoding
    reuses one tile shape, so it compiles once for any image size.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    def check_images(self, x) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, H, W) with H and W divisible by the downsampling."""
        c, f = self.cfg.in_channels, self.cfg.downsample_factor
        if len(x.shape) != 4 or x.shape[1] != c:
            raise ValueError(f"images must be (B, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image height and width must be divisible by {f}, got {x.shape[2]}x{x.shape[3]}")

    def check_latents(self, z) -> None:
        """Raise ``ValueError`` unless ``z`` is (B, latent_channels, h, w) and finite (NaN would decode to black)."""
        c = self.cfg.latent_channels
        if len(z.shape) != 4 or z.shape[1] != c:
            raise ValueError(f"latents must be (B, {c}, h, w), got shape {tuple(z.shape)}")
        arr = z.astype(ms.float32).asnumpy() if isinstance(z, Tensor) else np.asarray(z)
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            raise ValueError(f"latents contain {bad} non-finite values (NaN/inf); the denoiser diverged or overflowed")

    def encode(self, x) -> DiagonalGaussian:
        """(B, in_channels, H, W) images in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f)."""
        self.check_images(x)
        moments = self.encoder(x.astype(self.dtype))
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z, tiling: Tiling | None = None):
        """(B, latent_channels, h, w) unscaled latents -> (B, out_channels, h*f, w*f) images, about [-1, 1]."""
        self.check_latents(z)
        z = z.astype(self.dtype)
        if tiling is None or (z.shape[2] <= tiling.tile and z.shape[3] <= tiling.tile):
            return self._decode(z)
        return self._decode_tiled(z, tiling)

    def _decode(self, z):
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode_tiled(self, z, tiling: Tiling):
        """Decode equal tiles one at a time and blend them on the host: memory is one tile's activations plus the
        output image."""

        def decode(tile):
            return self._decode(tile).astype(ms.float32).asnumpy()

        image = _blend_tiles(decode, z, tiling, self.cfg.downsample_factor, self.cfg.out_channels)  # (B, C, H, W)
        return Tensor(image).astype(self.dtype)


def _blend_tiles(decode, z, tiling: Tiling, f: int, channels: int) -> np.ndarray:
    """(B, channels, h*f, w*f) float32 image of latents z (B, C, h, w), decoded tile by tile by ``decode`` (a latent
    tile -> its float32 host image) and blended by ``_blend_weights`` over ``_tile_layout``."""
    b, _, h, w = z.shape
    (th, rows), (tw, cols) = _tile_layout(h, tiling), _tile_layout(w, tiling)
    row_w, col_w = _blend_weights(rows, th, f), _blend_weights(cols, tw, f)  # per tile, (th*f,) / (tw*f,)
    out = np.zeros((b, channels, h * f, w * f), np.float32)
    total = np.zeros((h * f, w * f), np.float32)
    for y0, wy in zip(rows, row_w):
        for x0, wx in zip(cols, col_w):
            tile = decode(z[:, :, y0 : y0 + th, x0 : x0 + tw])
            weight = wy[:, None] * wx[None, :]  # (th*f, tw*f)
            ys, xs = slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f)
            out[:, :, ys, xs] += tile * weight
            total[ys, xs] += weight
    return out / total


def _tile_layout(size: int, tiling: Tiling) -> tuple:
    """(tile length, starts) of the fewest equal tiles of at most ``tiling.tile`` that cover [0, size) with at least
    ``round(tiling.tile * tiling.overlap)`` shared pixels between neighbours, each as short as that allows and spaced
    evenly. Equal tiles compile one graph; shortening them decodes no more area than the overlap needs: a 128² latent
    with tile 64 and overlap 0.25 decodes 3 x 3 tiles of 54² (162² in all; diffusers' ragged edge tiles, 160²)."""
    if size <= tiling.tile:
        return size, [0]
    shared = min(round(tiling.tile * tiling.overlap), tiling.tile - 1)
    n = math.ceil((size - shared) / (tiling.tile - shared))  # fewest tiles: n * tile - (n - 1) * shared >= size
    tile = math.ceil((size + (n - 1) * shared) / n)
    assert tile <= tiling.tile
    return tile, [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _blend_weights(starts: list, tile: int, f: int) -> list:
    """Per tile, a (tile*f,) weight rising linearly across the overlap with the previous tile and falling across the
    overlap with the next one, so that two neighbours sum to one where they overlap."""
    weights = []
    for i, s in enumerate(starts):
        pos = np.arange(tile * f, dtype=np.float32) + 0.5  # pixel centres within the tile
        w = np.ones(tile * f, np.float32)
        rise = (starts[i - 1] + tile - s) * f if i > 0 else 0  # pixels shared with the previous tile
        if rise > 0:
            w = np.minimum(w, pos / rise)
        fall = (s + tile - starts[i + 1]) * f if i + 1 < len(starts) else 0  # ... and with the next one
        if fall > 0:
            w = np.minimum(w, (tile * f - pos) / fall)
        weights.append(w)
    return weights


# ------------------------------------------------------------------------------------------------------------------
# Latents <-> images (host-side numpy at the boundary)
# ------------------------------------------------------------------------------------------------------------------
def decode_latents(vae: AutoencoderKL, latents, tiling: Tiling | None = None) -> np.ndarray:
    """Denoiser-space latents (B, C, h, w) -> float32 images (B, 3, H, W) in about [-1, 1] (not clamped)."""
    vae.check_latents(latents)
    z = latents.astype(ms.float32).asnumpy() if isinstance(latents, Tensor) else np.asarray(latents, np.float32)
    z = z / vae.cfg.scaling_factor + (vae.cfg.shift_factor or 0.0)
    x = vae.decode(Tensor(z), tiling).astype(ms.float32).asnumpy()
    if not np.isfinite(x).all():
        raise ValueError(
            f"the VAE decoded non-finite values in {vae.dtype}; the SDXL VAE overflows in fp16, decode in fp32"
        )
    return x


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 via clamp((x + 1) / 2, 0, 1), rounded as diffusers does."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(x.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def latents_to_images(vae: AutoencoderKL, latents, tiling: Tiling | None = None) -> list:
    """Denoiser-space latents (B, C, h, w) -> list of B RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(decode_latents(vae, latents, tiling))]


def images_to_array(images) -> np.ndarray:
    """PIL images (one size, any mode) -> float32 (B, 3, H, W) in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), np.float32) for im in images]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to be encoded as a batch, got (H, W) sizes {sizes}")
    return np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0


def images_to_latents(vae: AutoencoderKL, images, sample: bool = False, seed: int = 0) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] (array or Tensor) or a list of PIL images -> denoiser-space latents, float32.

    Uses the posterior mean, or a sample drawn with ``seed`` when ``sample`` is set.
    """
    if isinstance(images, list | tuple):
        images = images_to_array(images)
    x = images.astype(ms.float32).asnumpy() if isinstance(images, Tensor) else np.asarray(images, np.float32)
    vae.check_images(x)
    if not np.isfinite(x).all():
        raise ValueError("images contain non-finite values (NaN/inf)")
    posterior = vae.encode(Tensor(x))
    z = posterior.sample(seed) if sample else posterior.mean
    z = z.astype(ms.float32).asnumpy()
    return (z - (vae.cfg.shift_factor or 0.0)) * vae.cfg.scaling_factor
