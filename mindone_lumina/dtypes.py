"""The one table of dtype names: the short names of CLIs and recipes (fp32, fp16, bf16), the names checkpoint files
use (float32, ...) and MindSpore's dtypes."""

import mindspore as ms

SHORT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_MINDSPORE = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name: str):
    """MindSpore dtype of a short (``fp16``) or file (``float16``) name."""
    full = SHORT.get(name, name)
    if full not in _MINDSPORE:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(SHORT)}")
    return _MINDSPORE[full]


def file_name(dtype) -> str:
    """The file name (``float16``) of a MindSpore floating dtype."""
    for name, value in _MINDSPORE.items():
        if value == dtype:
            return name
    raise ValueError(f"no file name for dtype {dtype}")
