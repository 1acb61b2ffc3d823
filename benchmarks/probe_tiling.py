"""How far tiled VAE decoding lands from the untiled decode: the project's tile layout against diffusers' tiled_decode.

    python benchmarks/probe_tiling.py

A random two-level diffusers VAE (the "two-level" config of tests/test_vae.py: SDXL's layout shrunk, weights from
``parity.randomize_torch_``) decodes square random latents whole, in diffusers' ragged tiles (``enable_tiling``), and
in the layout of ``vae._tile_layout`` (equal tiles as short as the overlap allows, blended by ``vae._blend_tiles``),
for five latent / tile sizes at overlap 0.25. Every decode, tiles included, runs in torch: the comparison is of the
layouts, and the project's MindSpore decode of a tile equals torch's to 1e-6 (tests/test_vae.py). Printed per case:
mean absolute difference to the untiled decode and the latent area each layout decodes. Random weights make the
mid-block attention and per-tile GroupNorm statistics far more non-local than a trained VAE's, so the differences are
large; read them as a comparison of layouts.
"""

import numpy as np
import torch
from diffusers import AutoencoderKL

from mindone_lumina.models import vae
from mindone_lumina.parity import randomize_torch_

CASES = [(24, 12), (32, 12), (40, 16), (48, 16), (64, 24)]  # (latent side, largest tile)
F = 2  # the two-level VAE's upsampling factor


def project_tiled(model, z: torch.Tensor, tile: int) -> tuple:
    """(image, decoded latent area) of the project's tile layout and blending (``vae._blend_tiles``), each tile
    decoded by ``model``."""
    tiling = vae.Tiling(tile)
    (th, rows), (tw, cols) = vae._tile_layout(z.shape[2], tiling), vae._tile_layout(z.shape[3], tiling)
    with torch.no_grad():
        image = vae._blend_tiles(lambda t: model.decode(t).sample.numpy(), z, tiling, F, 3)
    return image, len(rows) * len(cols) * th * tw


def diffusers_area(size: int, tile: int) -> int:
    """Latent area diffusers' tiled_decode decodes: tiles every ``tile * 0.75``, the last ones cut at the edge."""
    stride = int(tile * 0.75)
    side = sum(min(tile, size - start) for start in range(0, size, stride))
    return side * side


def main():
    torch.manual_seed(0)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=32,
    ).eval()
    randomize_torch_(model)
    print("| latent | tile | diffusers: mean abs diff (area) | project: mean abs diff (area) | project / diffusers |")
    print("|---|---|---|---|---|")
    for size, tile in CASES:
        z = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 4, size, size)).astype(np.float32))
        with torch.no_grad():
            full = model.decode(z).sample.numpy()
            model.enable_tiling()
            model.tile_latent_min_size, model.tile_sample_min_size = tile, tile * F
            theirs = np.abs(model.decode(z).sample.numpy() - full).mean()
            model.disable_tiling()
        image, area = project_tiled(model, z, tile)
        ours = np.abs(image - full).mean()
        print(f"| {size}² | {tile} | {theirs:.4f} ({diffusers_area(size, tile)}) | {ours:.4f} ({area}) "
              f"| {ours / theirs:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
