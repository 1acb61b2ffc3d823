"""Extract VAE latents and Gemma caption features of a dataset into a sharded feature store (the cached data mode).

    python tools/extract_features.py --data SRC [SRC ...] --text-encoder DIR [--vae DIR] --output STORE \
        [--resolution 1024] [--aspect-ratios 1 0.5 2] [--max-caption-tokens 256] [--batch 16] [--shard-mb 256]
    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=logs python tools/extract_features.py ...

SRC: a folder with captions.jsonl, a .json list or .jsonl file of entries, or the original Lumina .yaml data config
(``training/sources.py``). Under msrun each rank takes every world-th item and writes its own part of STORE. Killed,
it resumes from its last complete shard when run again with the same arguments; a store made with other settings
is refused. Skipped items (no image path, missing caption, unreadable, too small) are counted per reason.
"""

import functools

import mindspore as ms

from mindone_lumina import backend, cli, components
from mindone_lumina.training.data import buckets
from mindone_lumina.training.extract import extract, store_meta
from mindone_lumina.training.loop import data_parallel_world
from mindone_lumina.training.sources import read_items


def parser():
    p = cli.Parser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True, help="data sources (folders, .json, .jsonl, .yaml)")
    p.add_argument("--text-encoder", required=True, help="Hugging Face Gemma folder (config, safetensors, tokenizer)")
    p.add_argument("--vae", help="diffusers vae/ folder (default: none, the images themselves are stored)")
    p.add_argument("--output", required=True, help="the feature store folder (created; resumed if it exists)")
    p.add_argument("--resolution", type=cli.integer(1), default=1024, help="pixels per side of the bucket area "
                   "(default: 1024)")  # fmt: skip
    p.add_argument("--aspect-ratios", type=cli.number(above=0), nargs="+", default=[1.0],
                   help="width / height of the buckets (default: 1)")  # fmt: skip
    p.add_argument("--bucket-multiple", type=cli.integer(1), default=16, help="bucket sides are multiples of this "
                   "(default: 16)")  # fmt: skip
    p.add_argument("--max-caption-tokens", type=cli.integer(1), default=256, help="token limit (default: 256)")
    p.add_argument("--batch", type=cli.integer(1), default=16, help="items per encoder call (default: 16)")
    p.add_argument("--shard-mb", type=cli.integer(1), default=256, help="shard size bound in MiB (default: 256)")
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph", help="MindSpore execution mode")
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on (default: CPU)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cli.existing(args.text_encoder, "--text-encoder", "folder")
    if args.vae:
        cli.existing(args.vae, "--vae", "folder")
    items = read_items(args.data)  # a bad list fails here, before any model loads
    if not items:
        raise ValueError(f"--data {' '.join(args.data)} lists no items")
    bucket_list = buckets(args.resolution, args.aspect_ratios, args.bucket_multiple)
    meta = store_meta(items, args.text_encoder, args.vae, bucket_list, args.max_caption_tokens)
    backend.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    rank, world = data_parallel_world()
    encoder = components.load_text_encoder(args.text_encoder)
    tokenizer = components.load_tokenizer(args.text_encoder, encoder.cfg)
    vae = components.load_vae(args.vae) if args.vae else None
    extract(items, args.output, meta, tokenizer, encoder, vae, bucket_list, args.max_caption_tokens, rank, world,
            args.batch, args.shard_mb << 20, log=functools.partial(print, flush=True))  # fmt: skip


if __name__ == "__main__":
    cli.run(main)
