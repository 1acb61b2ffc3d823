"""Tokenizers of the prompt encoders and the prompt batch both Lumina generations build.

The tokenizers are the reference's own (transformers ``GemmaTokenizerFast`` / LLaMA's), loaded from a local folder
with the right padding Lumina uses (a folder does not store it). ``train_tokenizer`` makes a small byte-level BPE in
either family's layout of special tokens, for small models and tests: any text encodes.
"""

import logging
import os
import re
import warnings

FILES = ("tokenizer.json", "tokenizer.model")  # either one is enough for the fast tokenizers


class _NoFrameworkNotice(logging.Filter):
    """Drops the notice transformers logs when it is imported without PyTorch, TensorFlow or Flax ("None of PyTorch,
    TensorFlow >= 2.0, or Flax have been found. Models won't be available..."): this package uses only its
    tokenizers, which need none of them, so a user would see it on every run and could do nothing about it. Its
    other warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("None of PyTorch, TensorFlow")


# on transformers' root logger, which logs the notice at import: installed here, before any `import transformers`
logging.getLogger("transformers").addFilter(_NoFrameworkNotice())
# family -> (transformers class, special tokens in id order, constructor arguments)
_FAMILIES = {
    "gemma": ("GemmaTokenizerFast", ("<pad>", "<eos>", "<bos>", "<unk>"),
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}),
    "llama": ("LlamaTokenizerFast", ("<unk>", "<s>", "</s>"),
              {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "add_eos_token": True, "legacy": True}),
}  # fmt: skip


def load_tokenizer(folder: str, family: str = "gemma"):
    """Gemma's tokenizer (BOS prepended, no EOS), or LLaMA's with BOS and EOS as ``lumina_t2i/demo.py`` loads it;
    right padding."""
    if not os.path.isdir(folder):
        raise ValueError(f"tokenizer folder not found: {folder}")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in FILES):
        raise ValueError(f"{folder} has no tokenizer: expected one of {list(FILES)}")
    import transformers  # the reference's tokenizers; imported only when needed

    if family == "gemma":
        tokenizer = transformers.GemmaTokenizerFast.from_pretrained(folder)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
    tokenizer.padding_side = "right"
    return tokenizer


def train_tokenizer(texts, vocab_size: int, family: str = "gemma"):
    """A byte-level BPE trained on ``texts`` with the family's special ids (Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3;
    LLaMA: <unk> 0, <s> 1, </s> 2). Save it with ``save_pretrained``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cls, specials, kwargs = _FAMILIES[family]
    texts = list(texts)
    if not texts or vocab_size < 256 + len(specials):
        raise ValueError(f"need at least one text and vocab_size >= {256 + len(specials)} (bytes + specials), "
                         f"got {vocab_size}")  # fmt: skip
    bpe = Tokenizer(models.BPE(unk_token=kwargs["unk_token"] if family == "llama" else None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars go to stdout, into the tables of the scripts that build tokenizers
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = getattr(transformers, cls)(tokenizer_object=bpe, **kwargs)
    tokenizer.padding_side = "right"
    return tokenizer


def words(text: str) -> list:
    """The lower-case words (letter runs) of ``text``: what a closed caption vocabulary is made of."""
    return re.findall(r"[a-z]+", text.lower())


def prompt_batch(prompts, negative_prompt) -> list:
    """``[prompts..., negatives...]``: ``negative_prompt`` is one string for every row, a list of one per prompt, or
    None for conditional rows only. ``ValueError`` names a row that is not a string."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if negative_prompt is None:
        negatives = []
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    elif isinstance(negative_prompt, list | tuple) and len(negative_prompt) == len(prompts):
        negatives = list(negative_prompt)
    else:
        raise ValueError(
            f"negative_prompt must be a string, None, or a list of {len(prompts)} strings, got {negative_prompt!r}"
        )
    for kind, rows in (("prompt", prompts), ("negative prompt", negatives)):
        for i, p in enumerate(rows):
            if not isinstance(p, str):
                raise ValueError(f"{kind} {i} must be a string, got {type(p).__name__} {p!r}")
    return list(prompts) + list(negatives)


def warn_truncated(tokenizer, texts, kept_lengths, max_length: int):
    """Rows that filled ``max_length`` may have been cut; count the lost tokens with an untruncated call."""
    full = [i for i, n in enumerate(kept_lengths) if n >= max_length]
    if not full:
        return
    lengths = [len(ids) for ids in tokenizer([texts[i] for i in full])["input_ids"]]
    for i, n in zip(full, lengths):
        if n > max_length:
            warnings.warn(
                f"prompt {i} is {n} tokens long; truncated to max_length={max_length} ({n - max_length} tokens cut)",
                stacklevel=3,
            )
