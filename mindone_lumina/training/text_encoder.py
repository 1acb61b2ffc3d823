"""Teaching a small text encoder what its captions say, before it is frozen for DiT training.

Lumina's text encoder is a pretrained LLM: its features already say which colour goes with which noun, wherever the
words stand. A small random decoder's features do not: they mix whatever came before each token, so a DiT trained on
them can follow one fixed caption template but not the phrasings people type. ``teach_attributes`` gives the small
encoder what pretraining gives the large one: linear heads on the masked mean of its caption features (the pooled
vector Next-DiT's ``cap_embedder`` reads) learn to name each caption's attributes (categorical labels such as
``{"shape": "circle", "colour": "red", "position": "none"}``), and the encoder learns with them. The heads are then
dropped; the encoder is saved and frozen like any other.
"""

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from .recipe import Recipe, lr_at
from .step import Trainer


class AttributeHeads(nn.Cell):
    """The encoder plus one linear head per attribute on its masked-mean caption features."""

    def __init__(self, encoder, classes: dict):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.CellList([nn.Dense(encoder.cfg.hidden_size, len(values)) for values in classes.values()])

    def construct(self, ids, mask):
        h = self.encoder(ids, mask)  # (B, L, D)
        m = mask.astype(h.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (h * m).sum(axis=1) / m.sum(axis=1)  # (B, D)
        return tuple(head(pooled) for head in self.heads)  # each (B, classes)


class AttributeLoss(nn.Cell):
    """Mean cross-entropy of every attribute head: ``construct(ids, mask, labels)`` with labels (B, attributes)."""

    def __init__(self, model: AttributeHeads):
        super().__init__()
        self.model = model
        self.ce = nn.CrossEntropyLoss()

    def construct(self, ids, mask, labels):
        logits = self.model(ids, mask)
        loss = 0.0
        for i, lg in enumerate(logits):
            loss = loss + self.ce(lg, labels[:, i])
        return loss / len(logits)


def label_table(labels: list) -> tuple:
    """(classes, codes): ``classes`` maps each attribute to its sorted values, ``codes`` is (N, attributes) int32.
    Every row must name the same attributes."""
    if not labels:
        raise ValueError("no captions to teach from")
    names = sorted(labels[0])
    for i, row in enumerate(labels):
        if sorted(row) != names:
            raise ValueError(f"caption {i} has attributes {sorted(row)}; every caption needs {names}")
    classes = {n: sorted({row[n] for row in labels}) for n in names}
    codes = np.array([[classes[n].index(row[n]) for n in names] for row in labels], np.int32)
    return classes, codes


def teach_attributes(encoder, tokenizer, captions: list, labels: list, steps: int = 400, batch_size: int = 256,
                     lr: float = 1e-3, seed: int = 0, log=print) -> dict:  # fmt: skip
    """Train ``encoder`` (in place) with attribute heads on ``captions`` tokenized as ``gemma.encode_prompts`` does
    (BOS, right padding). Returns each attribute's accuracy on all captions after training."""
    classes, codes = label_table(labels)
    tokens = tokenizer(captions, padding=True, pad_to_multiple_of=8, padding_side="right", return_tensors="np")
    ids, mask = tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
    if ids.shape[1] > encoder.cfg.max_position_embeddings:
        limit = encoder.cfg.max_position_embeddings
        raise ValueError(f"captions of {ids.shape[1]} tokens exceed the encoder's {limit} positions")
    model = AttributeHeads(encoder, classes)
    cfg = Recipe(data="", output="", steps=steps, batch_size=batch_size, lr=lr, lr_schedule="cosine",
                 warmup_steps=min(50, steps // 10), ema_decay=0.0, grad_clip=1.0)  # fmt: skip
    trainer = Trainer(AttributeLoss(model), cfg)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        pick = rng.integers(len(captions), size=batch_size)
        loss, _ = trainer.step(Tensor(lr_at(cfg, step), ms.float32), Tensor(ids[pick]), Tensor(mask[pick]),
                               Tensor(codes[pick]))  # fmt: skip
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"text encoder step {step + 1}/{steps} loss {float(loss.asnumpy()):.4f}")
    hits = np.zeros(len(classes))
    for start in range(0, len(captions), 1024):
        logits = model(Tensor(ids[start : start + 1024]), Tensor(mask[start : start + 1024]))
        predicted = np.stack([lg.asnumpy().argmax(axis=-1) for lg in logits], axis=1)
        hits += (predicted == codes[start : start + 1024]).sum(axis=0)
    return {name: float(h / len(captions)) for name, h in zip(classes, hits)}
