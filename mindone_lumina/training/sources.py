"""Where training samples come from (issue #27): (id, image path, caption) items from the list formats people have.

* a folder with ``captions.jsonl`` (``{"image": relative path, "caption": text}`` per line), this project's format;
* a ``.json`` file holding a list of entries, or a ``.jsonl`` file with one entry per line;
* the original Lumina training config, a ``.yaml`` with ``META: [{path: list.json | list.jsonl, type: name,
  root: folder (optional), ratio: fraction (optional)}]``; ``ratio`` keeps ``Random(0).sample`` of the entries, the
  original's choice.

An entry's image is its ``image``, ``path`` or ``image_path`` field, relative paths taken from ``root`` or else the
list file's folder; its caption is ``caption``, ``prompt``, ``gpt_4_caption`` or the last turn of ``conversations``
(the original's fields). Images are not opened here. An entry without an image path or caption is still listed (with
None), so that the extraction skips and counts it; a file that cannot be read or parsed is an error naming it.
Ids are the entries' running numbers over all sources in the order given, as strings.
"""

import hashlib
import json
import os
import random
from dataclasses import dataclass

from ..atomic import read_yaml

IMAGE_FIELDS = ("image", "path", "image_path")
CAPTION_FIELDS = ("caption", "prompt", "gpt_4_caption")


@dataclass(frozen=True)
class Item:
    id: str
    image: str | None  # absolute or relative to the working directory; None: the entry names no image
    caption: str | None  # None: the entry has no (non-empty) caption


def read_items(sources) -> list:
    """The items of every source (folders, ``.json``/``.jsonl`` lists, ``.yaml`` configs), in order."""
    if isinstance(sources, str):
        sources = [sources]
    entries = []  # (entry, the folder its relative image paths start from)
    for source in sources:
        if os.path.isdir(source):
            entries += _read_list(os.path.join(source, "captions.jsonl"), None)
        elif source.endswith((".yaml", ".yml")):
            entries += _read_config(source)
        else:
            entries += _read_list(source, None)
    return [_item(str(n), row, folder) for n, (row, folder) in enumerate(entries)]


def items_digest(items: list) -> str:
    """A digest of every item's image and caption (ids are list positions, so an edit anywhere changes them)."""
    return hashlib.sha256(json.dumps([[i.image, i.caption] for i in items]).encode()).hexdigest()[:16]


def _read_config(path: str) -> list:
    config = read_yaml(path, "data config")
    if not isinstance(config.get("META"), list):
        raise ValueError(f"{path}: a data config is a mapping with a META list of {{path: ..., type: ...}}")
    out = []
    for n, meta in enumerate(config["META"]):
        if not isinstance(meta, dict) or not isinstance(meta.get("path"), str):
            raise ValueError(f"{path}: META entry {n} needs a string 'path'")
        list_path = meta["path"]
        if not os.path.isabs(list_path):
            list_path = os.path.join(os.path.dirname(path), list_path)
        entries = _read_list(list_path, meta.get("root"))
        if "ratio" in meta:
            ratio = meta["ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
                raise ValueError(f"{path}: META entry {n}: ratio must be in (0, 1], got {ratio!r}")
            entries = random.Random(0).sample(entries, int(len(entries) * ratio))
        out += entries
    return out


def _read_list(path: str, root) -> list:
    """[(entry, image folder)] of a ``.json`` list or ``.jsonl`` file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (a data source is a folder with captions.jsonl, .json, .jsonl, .yaml)")
    folder = root if isinstance(root, str) else os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                rows = json.load(f)
                if not isinstance(rows, list):
                    raise ValueError(f"{path} holds a JSON {type(rows).__name__}, expected a list of entries")
                where = [f"{path} entry {n}" for n in range(len(rows))]
            elif path.endswith(".jsonl"):
                rows, where = [], []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path} line {n}: not JSON ({e})") from e
                        where.append(f"{path} line {n}")
            else:
                raise ValueError(f"{path}: unknown list format (expected .json or .jsonl)")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    for row, at in zip(rows, where):
        if not isinstance(row, dict):
            raise ValueError(f"{at}: an entry is a JSON object, got {type(row).__name__}")
    return [(row, folder) for row in rows]


def _item(sample_id: str, row: dict, folder: str) -> Item:
    image = next((row[k] for k in IMAGE_FIELDS if isinstance(row.get(k), str) and row[k]), None)
    if image is not None and not os.path.isabs(image):
        image = os.path.join(folder, image)
    caption = next((row[k] for k in CAPTION_FIELDS if isinstance(row.get(k), str)), None)
    turns = row.get("conversations")
    if caption is None and isinstance(turns, list) and turns and isinstance(turns[-1], dict):
        caption = turns[-1].get("value") if isinstance(turns[-1].get("value"), str) else None
    return Item(sample_id, image, caption if caption and caption.strip() else None)
