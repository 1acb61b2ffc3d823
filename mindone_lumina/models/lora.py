"""LoRA (Hu et al., 2021) on the linear layers of a DiT block: ``y = W x + b + sum_i s_i B_i A_i dropout(x)``.

The project's own small layer rather than ``mindone.peft``: mindone 0.5.0's LoRA draws its dropout with
``mint.nn.Dropout``, which has no CPU kernel (``DropoutExt``), and importing ``mindone.peft`` takes about 7 s and
prints to stdout (it imports ``mindone.transformers``). The arithmetic and the initial draws are peft's (A
Kaiming-uniform with a = sqrt(5), B zero, scaling alpha / r or alpha / sqrt(r) with rsLoRA), and files are peft's
(``weights/lora.py``).

A targeted ``nn.Dense`` is replaced by a ``LoRADense`` that holds the *same* weight and bias Parameters under the same
names, plus one ``Adapter`` per loaded adapter (several at inference, each with its own scale). The base is never
written while adapters are attached, so ``unload`` puts plain Dense layers back with bit-identical weights; ``merge``
folds the adapters into the weights for deployment. Parameter names: ``<layer path>.adapters.<k>.lora_A`` (r, in) and
``.lora_B`` (out, r), ``k`` the adapter's position in ``LoRADense.names``.
"""

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from .. import backend
from .layers import LayerNorm, linear

# recipe target group -> linear layers of a block (the project's names, shared by Next-DiT and Flag-DiT)
TARGETS = {
    "attention": ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "attention.wk_y", "attention.wv_y",
                  "attention.wq_y"),
    "feed_forward": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "adaln": ("adaLN_modulation.1",),
}  # fmt: skip


@dataclass(frozen=True)
class LoRAConfig:
    """The ``lora:`` section of a recipe."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("attention", "feed_forward")
    rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not _number(self.alpha) or not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora targets must be a non-empty list of {sorted(TARGETS)}, got {list(self.targets)}")

    @property
    def scaling(self) -> float:
        return scaling(self.alpha, self.rank, self.rslora)

    @classmethod
    def from_dict(cls, raw: dict) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown lora key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**raw)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class Adapter(nn.Cell):
    """``scale * B A dropout(x)``; ``scale`` is a graph constant (set before the first call).

    Dropout (in training mode only) draws its keep-mask as a pure function of the element, the adapter and a shared
    ``clock`` Parameter that the trainer sets to the micro-batch index in each step, so a resumed run draws the
    masks a straight run draws (a stateful RNG restarts its stream on resume; MindSpore 2.10 has no CPU kernel that
    takes a generator state)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, scale: float, dropout: float = 0.0, clock=None,
                 salt: float = 0.0):  # fmt: skip
        super().__init__()
        # peft's init: A as nn.Linear's default (kaiming_uniform a=sqrt(5): U(+-1/sqrt(in))), B zero: starts at W
        self.lora_A = Parameter(initializer(HeUniform(math.sqrt(5)), (rank, in_dim)), name="lora_A")
        self.lora_B = Parameter(Tensor(np.zeros((out_dim, rank), np.float32)), name="lora_B")
        self.scale = float(scale)
        self.dropout, self.salt = float(dropout), float(salt)
        if dropout > 0:
            assert clock is not None, "dropout needs the model's clock"
            self.clock = clock

    def construct(self, x):
        if self.dropout > 0 and self.training:
            x = x * (keep_mask(x.shape, self.clock, self.salt, self.dropout) / (1.0 - self.dropout)).astype(x.dtype)
        # weights in the input's dtype: mixed precision (Cell.to_float) casts the inputs of Cells, not these
        h = ops.dense(x, self.lora_A.astype(x.dtype))  # (..., r)
        return ops.dense(h, self.lora_B.astype(x.dtype)) * self.scale  # (..., out)


def keep_mask(shape: tuple, clock, salt: float, p: float):
    """A float {0, 1} mask of ``shape`` keeping each element with probability 1 - p: a sine hash of (row, column,
    clock, salt), the same for the same arguments on every run (rows: all leading axes flattened)."""
    rows = 1
    for n in shape[:-1]:
        rows *= n
    a = ops.arange(rows, dtype=ms.float32).reshape(-1, 1)  # (rows, 1)
    b = ops.arange(shape[-1], dtype=ms.float32).reshape(1, -1)  # (1, cols)
    phase = ops.sin(clock.astype(ms.float32) * 0.61803398 + salt) * 1e3  # per step and adapter, kept small
    h = ops.sin(ops.remainder(a * 12.9898 + phase, 6283.1853) + b * 78.233) * 43758.5453
    return ((h - ops.floor(h)) >= p).astype(ms.float32).reshape(shape)


class LoRADense(nn.Cell):
    """A frozen ``nn.Dense`` (its own Parameters, same names) plus adapters."""

    def __init__(self, base: nn.Dense):
        super().__init__()
        self.in_dim, self.out_dim = base.in_channels, base.out_channels
        self.weight = base.weight  # (out, in)
        self.bias = base.bias if base.has_bias else None
        self.adapters = nn.CellList()
        self.names = []

    def construct(self, x):
        bias = None if self.bias is None else self.bias.astype(x.dtype)
        out = ops.dense(x, self.weight.astype(x.dtype), bias)  # (..., out)
        for adapter in self.adapters:
            out = out + adapter(x).astype(out.dtype)
        return out

    def delta(self) -> np.ndarray:
        """sum_i s_i B_i A_i in fp32: what ``merge`` adds to the weight."""
        total = np.zeros((self.out_dim, self.in_dim), np.float32)
        for a in self.adapters:
            total += a.scale * (_fp32(a.lora_B) @ _fp32(a.lora_A))
        return total

    def plain(self) -> nn.Dense:
        """An ``nn.Dense`` holding this layer's weight and bias Parameters (the same objects)."""
        dense = nn.Dense(self.in_dim, self.out_dim, has_bias=self.bias is not None, weight_init="zeros",
                         bias_init="zeros")  # fmt: skip
        dense.weight = self.weight
        if self.bias is not None:
            dense.bias = self.bias
        return dense


# ------------------------------------------------------------------------------------------------------------------
# A model's adapters
# ------------------------------------------------------------------------------------------------------------------
def target_paths(model: nn.Cell, targets) -> list:
    """Paths of the linear layers of ``model``'s blocks that the target groups name (e.g. ``layers.3.attention.wq``)."""
    names = "|".join(re.escape(n) for group in targets for n in TARGETS[group])
    pattern = re.compile(rf"^layers\.\d+\.({names})$")
    return [path for path, cell in model.cells_and_names() if pattern.match(path) and isinstance(cell, nn.Dense)]


def lora_layers(model: nn.Cell) -> dict:
    """Path -> ``LoRADense`` of every adapted layer."""
    return {path: cell for path, cell in model.cells_and_names() if isinstance(cell, LoRADense)}


def _parent(model: nn.Cell, path: str):
    *parents, leaf = path.split(".")
    cell = model
    for name in parents:
        cell = cell[int(name)] if name.isdigit() else getattr(cell, name)
    return cell, leaf


def _replace(model: nn.Cell, path: str, new: nn.Cell) -> None:
    parent, leaf = _parent(model, path)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def _changed(model: nn.Cell) -> None:
    """After layers were swapped: ``Parameter.name`` = path in ``model`` (a Cell set as an attribute prefixes only its
    attribute name, so swapped layers would share names such as ``lora_A``, which the optimizer state keys on), and
    the compiled graphs dropped (graph mode would otherwise run the graph compiled before the swap)."""
    for path, p in model.parameters_and_names():
        p.name = path
    backend.release_compiled(model)


def attach(model: nn.Cell, name: str, ranks: dict, scales: dict, dropout: float = 0.0) -> None:
    """Add adapter ``name`` to the layers ``ranks`` names (path -> rank) with ``scales`` (path -> s)."""
    layers = lora_layers(model)
    if any(name in layer.names for layer in layers.values()):
        raise ValueError(f"the model already has an adapter named {name!r}")
    cells = dict(model.cells_and_names())
    clock = Parameter(Tensor(0.0, ms.float32), name="lora_clock", requires_grad=False) if dropout > 0 else None
    for salt, (path, rank) in enumerate(ranks.items()):
        layer = layers.get(path)
        if layer is None:
            if not isinstance(cells.get(path), nn.Dense):
                raise ValueError(f"adapter {name!r}: the model has no linear layer {path!r}")
            layer = LoRADense(cells[path])
            _replace(model, path, layer)
        layer.adapters.append(Adapter(layer.in_dim, layer.out_dim, rank, scales[path], dropout, clock, salt))
        layer.names.append(name)
    _changed(model)


def add_adapter(model: nn.Cell, cfg: LoRAConfig, name: str = "default") -> list:
    """A new trainable adapter (B = 0: the model is unchanged) on the layers ``cfg.targets`` name; every other
    parameter frozen. Returns the adapted paths."""
    paths = target_paths(model, cfg.targets)
    if not paths:
        raise ValueError(f"lora targets {list(cfg.targets)} match no linear layer of this model")
    attach(model, name, dict.fromkeys(paths, cfg.rank), dict.fromkeys(paths, cfg.scaling), cfg.dropout)
    for path, p in model.parameters_and_names():
        p.requires_grad = path.endswith((".lora_A", ".lora_B"))
    return paths


def dropout_clock(model: nn.Cell):
    """The Parameter the adapters' dropout masks follow (None without dropout). The trainer assigns it the
    micro-batch index x world + rank inside the step graph (``FlowMatchingLoss``): ``set_data`` between calls does
    not reach a graph compiled by ``ms.jit`` (measured)."""
    return next((c.clock for _, c in model.cells_and_names() if isinstance(c, Adapter) and c.dropout > 0), None)


def adapter_state(model: nn.Cell, name: str = "default") -> dict:
    """``<layer path>.lora_A`` / ``.lora_B`` -> Parameter of adapter ``name``."""
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.names:
            adapter = layer.adapters[layer.names.index(name)]
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = adapter.lora_A, adapter.lora_B
    return out


def adapter_scales(model: nn.Cell, name: str = "default") -> dict:
    """Layer path -> scale of adapter ``name``."""
    return {p: la.adapters[la.names.index(name)].scale for p, la in lora_layers(model).items() if name in la.names}


def adapter_names(model: nn.Cell) -> list:
    return list(dict.fromkeys(n for layer in lora_layers(model).values() for n in layer.names))


def untie_query(model: nn.Cell) -> None:
    """Give every block's cross-attention its own query (``wq_y``, ``qy_norm``) as copies of the shared one, for an
    adapter that changes the two differently (diffusers' ``attn1.to_q`` and ``attn2.to_q``). ``unload`` ties again."""
    for block in model.layers:
        _untie(block.attention)
    _changed(model)


def _untie(att) -> None:
    if att.separate:
        return
    query = att.wq.plain() if isinstance(att.wq, LoRADense) else att.wq
    att.wq_y = linear(query.in_channels, query.out_channels, bias=False)
    att.wq_y.weight.set_data(query.weight.value().copy())
    if att.qk_norm:
        att.qy_norm = LayerNorm(query.out_channels)
        att.qy_norm.weight.set_data(att.q_norm.weight.value().copy())
        att.qy_norm.bias.set_data(att.q_norm.bias.value().copy())
    att.separate = True
    object.__setattr__(att, "untied_by_lora", True)


def untied_source(name: str) -> str:
    """The name of the shared query a name of ``untie_query``'s own cross-attention query was copied from."""
    return name.replace(".wq_y", ".wq").replace(".qy_norm", ".q_norm")


def mirror(target: nn.Cell, source: nn.Cell) -> nn.Cell:
    """``target``, a fresh block of ``source``'s architecture, given ``source``'s adapters (layers, ranks, scales)
    and untied query, with initial values: a graph template whose weights are bound later (the shared-block
    runner)."""
    if getattr(source.attention, "untied_by_lora", False):
        _untie(target.attention)
    ranks, scales = {}, {}  # adapter name -> layer path -> rank / scale
    for path, layer in lora_layers(source).items():
        for name, adapter in zip(layer.names, layer.adapters):
            ranks.setdefault(name, {})[path] = adapter.lora_A.shape[0]
            scales.setdefault(name, {})[path] = adapter.scale
    for name in ranks:
        attach(target, name, ranks[name], scales[name])
    _changed(target)
    return target


def _retie(model: nn.Cell) -> None:
    for block in getattr(model, "layers", ()):
        att = block.attention
        if getattr(att, "untied_by_lora", False):
            del att.wq_y
            if att.qk_norm:
                del att.qy_norm
            att.separate = False
            object.__delattr__(att, "untied_by_lora")


def unload(model: nn.Cell) -> None:
    """Remove every adapter: plain Dense layers with the untouched base weights (bit-identical to before)."""
    for path, layer in lora_layers(model).items():
        _replace(model, path, layer.plain())
    _retie(model)
    _changed(model)


def merge(model: nn.Cell) -> None:
    """Fold every adapter into its base weight (``W + sum s B A``, computed in fp32, stored in W's dtype) and
    remove the adapters: a plain model with no cost per step. Not reversible (``unload`` before merging is)."""
    for path, layer in lora_layers(model).items():
        w = layer.weight
        w.set_data(Tensor(_fp32(w) + layer.delta()).astype(w.dtype))
        _replace(model, path, layer.plain())
    untied = [b.attention for b in getattr(model, "layers", ()) if getattr(b.attention, "untied_by_lora", False)]
    for att in untied:  # the merged queries differ for good: the model is one with separate_cross_query now
        object.__delattr__(att, "untied_by_lora")
    if untied:
        model.cfg = dataclasses.replace(model.cfg, separate_cross_query=True)
    _changed(model)


def _fp32(x) -> np.ndarray:
    return ops.cast(x, ms.float32).asnumpy()
