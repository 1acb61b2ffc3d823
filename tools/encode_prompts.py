"""Encode prompts with Gemma into Lumina-Next caption features (also how training caches them).

    python tools/encode_prompts.py --model DIR --prompts "a cat" "a dog" [--prompts-file F] \
        [--negative-prompt TEXT | --no-negative] --output feats.npz [--mode graph|pynative] [--dtype fp32|fp16|bf16]

DIR is a Hugging Face Gemma folder (config.json, safetensors, tokenizer files). The .npz holds ``cap_feats``
(B, Lc, D) in the run dtype (bf16 is stored as fp32), ``cap_mask`` (B, Lc) int32 (1 = token) and ``texts`` (B,), the
encoded strings, rows ordered [prompts..., negatives...] as ``TextToImagePipeline.encode_prompts`` returns them. A LLaMA
folder (Lumina-T2I) is encoded the Lumina-T2I way.
"""

import numpy as np

import mindspore as ms

from mindone_lumina import cli, components
from mindone_lumina.atomic import atomic_path
from mindone_lumina.dtypes import ms_dtype
from mindone_lumina.text import gemma, llama


def read_prompts(prompts, prompts_file) -> list:
    """Command-line prompts, then one prompt per non-empty line of ``prompts_file``."""
    out = list(prompts or [])
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read prompts file {prompts_file}: {e}") from e
    if not out:
        raise ValueError("no prompts given: pass --prompts and/or a non-empty --prompts-file")
    return out


def parser():
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face Gemma folder (config, safetensors, tokenizer)")
    p.add_argument("--prompts", nargs="*", default=[], help="prompts to encode (default: none; --prompts, "
                   "--prompts-file or both)")  # fmt: skip
    p.add_argument("--prompts-file", help="text file with one prompt per line, empty lines skipped (default: none)")
    neg = p.add_mutually_exclusive_group()
    neg.add_argument("--negative-prompt", default="", help="unconditional prompt for every row (default: empty)")
    neg.add_argument("--no-negative", action="store_true", help="encode the prompts only, without negative rows")
    p.add_argument("--max-length", type=cli.integer(1), default=256,
                   help="token limit; longer prompts are cut with a warning")  # fmt: skip
    p.add_argument("--output", required=True, help="output .npz (an existing file is replaced)")
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph", help="MindSpore execution mode")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="encoder dtype")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    prompts = read_prompts(args.prompts, args.prompts_file)
    cli.existing(args.model, "--model", "folder")
    cli.output_file(args.output, "--output", overwrite=True)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    negative = None if args.no_negative else args.negative_prompt
    encoder = components.load_text_encoder(args.model, ms_dtype(args.dtype))
    tokenizer = components.load_tokenizer(args.model, encoder.cfg)
    if isinstance(encoder.cfg, llama.LlamaConfig):
        feats, mask = llama.encode_prompts(tokenizer, encoder, prompts, negative)
    else:
        feats, mask = gemma.encode_prompts(tokenizer, encoder, prompts, negative, max_length=args.max_length)
    if feats.dtype == ms.bfloat16:
        feats = feats.astype(ms.float32)  # numpy has no bfloat16
    texts = np.array(prompts + ([] if negative is None else [negative] * len(prompts)))
    with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
        np.savez(f, cap_feats=feats.asnumpy(), cap_mask=mask.asnumpy(), texts=texts)
    print(f"wrote {args.output}: cap_feats {tuple(feats.shape)} {args.dtype}, cap_mask {tuple(mask.shape)}")


if __name__ == "__main__":
    cli.run(main)
