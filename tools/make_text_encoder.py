"""Create a small Gemma-architecture text encoder with a BPE tokenizer trained on a dataset's captions.

python tools/make_text_encoder.py --captions data/captions.jsonl --out models/text_encoder --hidden 64 --layers 3
    [--teach-shapes 400]

The weights are drawn as the Hugging Face initialiser draws them (normal(0, std), norm weights 0 = scale 1). Frozen
and random, its features identify the tokens but not which colour goes with which noun: enough for one fixed caption
template, not for varied phrasings. ``--teach-shapes STEPS`` then trains it that many steps to name each caption's
shape, colours, size and position (``shapes.parse_prompt``; "none" for an unnamed size or position) from its pooled
features (``training.text_encoder``), as a pretrained LLM's features would; it is frozen after that.
"""

import json

import numpy as np

from mindone_lumina import cli, shapes
from mindone_lumina.io.diffusers_io import save_component
from mindone_lumina.text.decoder import DecoderEncoder
from mindone_lumina.text.gemma import GemmaConfig
from mindone_lumina.text.tokenizers import train_tokenizer
from mindone_lumina.training.text_encoder import teach_attributes
from mindone_lumina.weights.load import load_state_dict


def parser():
    p = cli.Parser(description=__doc__)
    p.add_argument("--captions", required=True, help="captions.jsonl of the training data")
    p.add_argument("--out", required=True, help="folder to create (transformers GemmaModel layout; absent or empty)")
    p.add_argument("--vocab", type=cli.integer(260), default=400, help="BPE vocabulary size, >= 260 (bytes + specials)")
    p.add_argument("--hidden", type=cli.integer(1), default=64, help="hidden size")
    p.add_argument("--layers", type=cli.integer(1), default=3, help="decoder layers; features are layer n-2's output")
    p.add_argument("--heads", type=cli.integer(1), default=4, help="attention heads (they divide --hidden)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of the random weights")
    p.add_argument("--teach-shapes", type=cli.integer(0), default=0, metavar="STEPS",
                   help="train it this many steps to name the shapes captions' attributes (0: random)")  # fmt: skip
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.hidden % args.heads:
        raise ValueError(f"--heads {args.heads} must divide --hidden {args.hidden}")
    cli.existing(args.captions, "--captions", "file")
    cli.output_folder(args.out, "--out", empty=True)
    with open(args.captions, encoding="utf-8") as f:
        try:
            captions = [json.loads(line)["caption"] for line in f if line.strip()]
        except (KeyError, TypeError) as e:  # JSON errors are ValueErrors already
            raise ValueError(f"--captions {args.captions}: every line must be an object with a 'caption'") from e
    labels = [shape_labels(c) for c in captions] if args.teach_shapes else None  # bad captions fail before training
    tokenizer = train_tokenizer(captions, args.vocab)
    cfg = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=1,
        head_dim=args.hidden // args.heads, max_position_embeddings=512,
    )  # fmt: skip
    encoder = DecoderEncoder(cfg)
    rng, std = np.random.default_rng(args.seed), 1.0 / args.hidden**0.5
    state = {p.name: (np.zeros(p.shape) if "norm" in p.name else std * rng.standard_normal(p.shape)).astype(np.float32)
             for p in encoder.get_parameters()}  # fmt: skip
    load_state_dict(encoder, state)
    if args.teach_shapes:
        accuracy = teach_attributes(encoder, tokenizer, captions, labels, steps=args.teach_shapes, seed=args.seed)
        print("attributes named from the pooled features: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    save_component("text_encoder", args.out, encoder, tokenizer)
    print(f"wrote {args.out}: {cfg}")


def shape_labels(text: str) -> dict:
    """The attributes a shapes caption names, "none" for an unnamed size or position."""
    try:
        named = shapes.parse_prompt(text)
    except ValueError as e:
        raise ValueError(f"--teach-shapes needs shapes captions: {e}") from None
    return {"size": "none", "position": "none"} | named


if __name__ == "__main__":
    cli.run(main)
