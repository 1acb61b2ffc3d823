"""Create a small frozen random Gemma-architecture text encoder with a BPE tokenizer trained on a dataset's captions.

python tools/make_text_encoder.py --captions data/captions.jsonl --out models/text_encoder --hidden 64 --layers 3
"""

import argparse
import json

from mindone_lumina.gemma import GemmaConfig, random_gemma_state, save_gemma, train_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", required=True, help="captions.jsonl of the training data")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=400)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3, help="decoder layers; features are the output of layer n-2")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with open(args.captions, encoding="utf-8") as f:
        captions = [json.loads(line)["caption"] for line in f if line.strip()]
    tokenizer = train_tokenizer(captions, args.vocab)
    cfg = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=1,
        head_dim=args.hidden // args.heads, max_position_embeddings=512,
    )  # fmt: skip
    save_gemma(args.out, cfg, random_gemma_state(cfg, args.seed, std=1.0 / args.hidden**0.5), tokenizer)
    print(f"wrote {args.out}: {cfg}")


if __name__ == "__main__":
    main()
