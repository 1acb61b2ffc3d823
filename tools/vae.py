"""Decode denoiser latents to images, or encode images to denoiser latents, with a diffusers-format SDXL VAE.

    python tools/vae.py decode --vae VAE_DIR --latents z.npz --output x.npz|PNG_DIR [--tiled [--tile 64]
        [--overlap 0.25]] [--mode graph|pynative] [--dtype fp32|fp16]
    python tools/vae.py encode --vae VAE_DIR --images a.png b.png --output z.npz [--sample --seed 0]

``z.npz`` holds ``latents`` (B, 4, h, w) in the denoiser's space (encode multiplies the posterior by the scaling
factor, decode divides by it). ``x.npz`` holds ``images`` (B, 3, H, W) in [-1, 1]; a folder output gets
``0000.png``, ``0001.png``, ... (existing ones are replaced only with ``--overwrite``). Every file is written to a
temporary name first and renamed into place, so an interrupted run leaves only whole files.
"""

import os

import numpy as np

import mindspore as ms

from mindone_lumina import backend, cli, components
from mindone_lumina.dtypes import ms_dtype
from mindone_lumina.models import vae


def parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decode", help="latents npz -> images npz or PNG folder")
    dec.add_argument("--latents", required=True, help="npz with 'latents' (B, 4, h, w), denoiser space")
    dec.add_argument("--tiled", action="store_true", help="decode in overlapping tiles (bounded memory)")
    dec.add_argument("--tile", type=int, default=64, help="tile side in latent pixels, >= 2")
    dec.add_argument("--overlap", type=float, default=0.25, help="minimum fraction of a tile shared by neighbours, "
                     "in [0, 1)")  # fmt: skip
    dec.add_argument("--overwrite", action="store_true", help="replace existing PNGs of a folder --output")
    enc = sub.add_parser("encode", help="image files -> latents npz")
    enc.add_argument("--images", required=True, nargs="+", help="image files of one size, sides divisible by 8")
    enc.add_argument("--sample", action="store_true", help="sample the posterior instead of taking its mean")
    enc.add_argument("--seed", type=cli.seed, default=0, help=f"seed of the posterior sample, 0..{cli.SEED_MAX}")
    for sp in (dec, enc):
        sp.add_argument("--vae", required=True, help="diffusers vae/ folder (config.json + safetensors)")
        sp.add_argument("--output", required=True, help="npz file (replaced if it exists), or (decode only) a "
                        "folder for PNGs")  # fmt: skip
        sp.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="MindSpore execution mode")
        sp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="VAE dtype")
        sp.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on")
    return p


def write_atomic(path: str, save, overwrite: bool = True) -> None:
    """``save(file_object)`` into a temporary file beside ``path``, then renamed to ``path`` (replacing it only with
    ``overwrite``)."""
    cli.write_new(path, lambda tmp: _save_to(tmp, save), overwrite, counter=False)


def _save_to(tmp: str, save) -> None:
    with open(tmp, "wb") as f:
        save(f)


def read_latents(path: str) -> np.ndarray:
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read latents {path}: {e}") from e
    if "latents" not in data:
        raise ValueError(f"{path} has no 'latents' array (found {sorted(data.files)})")
    return data["latents"]


def png_names(args, count: int) -> list:
    """The PNG files a folder ``--output`` gets for ``count`` images; taken ones need ``--overwrite``."""
    names = [os.path.join(args.output, f"{i:04d}.png") for i in range(count)]
    for name in names:
        cli.output_file(name, "--output", args.overwrite)
    return names


def decode(args, model, latents: np.ndarray, tiling, pngs: list) -> str:
    x = vae.decode_latents(model, latents, tiling)
    if args.output.endswith(".npz"):
        write_atomic(args.output, lambda f: np.savez(f, images=np.clip(x, -1.0, 1.0)))
        return f"images {x.shape}"
    from PIL import Image

    for name, arr in zip(pngs, vae.to_uint8(x)):
        write_atomic(name, lambda f, a=arr: Image.fromarray(a).save(f, "PNG"), args.overwrite)
    return f"{len(x)} PNGs {x.shape[2]}x{x.shape[3]}"


def read_images(args) -> list:
    from PIL import Image

    if not args.output.endswith(".npz"):
        raise ValueError(f"encode writes an npz file, got --output {args.output}")
    images = []
    for name in args.images:
        try:
            with Image.open(cli.existing(name, "--images", "file")) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"--images {name}: cannot read the image ({e})") from e
    return images


def encode(args, model, images: list) -> str:
    z = vae.images_to_latents(model, images, sample=args.sample, seed=args.seed)
    write_atomic(args.output, lambda f: np.savez(f, latents=z))
    return f"latents {z.shape}"


def main(argv=None):
    args = parser().parse_args(argv)
    cli.existing(args.vae, "--vae", "folder")
    if args.command == "decode":  # inputs read and outputs checked before the VAE is loaded
        try:
            tiling = vae.Tiling(args.tile, args.overlap) if args.tiled else None
        except ValueError as e:
            raise ValueError(f"--tile {args.tile} --overlap {args.overlap}: {e}") from None
        data = read_latents(cli.existing(args.latents, "--latents", "file"))
        pngs = []
        if args.output.endswith(".npz"):
            cli.output_file(args.output, "--output", overwrite=True)
        else:
            cli.output_folder(args.output, "--output")
            pngs = png_names(args, len(data))
    else:
        data = read_images(args)
        cli.output_file(args.output, "--output", overwrite=True)
    backend.set_device(args.device, convolutions=True)  # a VAE is convolutions
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    model = components.load_vae(args.vae, ms_dtype(args.dtype))
    what = decode(args, model, data, tiling, pngs) if args.command == "decode" else encode(args, model, data)
    print(f"wrote {args.output}: {what} ({args.mode}, {args.dtype})")


if __name__ == "__main__":
    cli.run(main)
