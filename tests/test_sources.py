"""Training sources (issue #27): this project's captions.jsonl folder, JSON and JSONL lists, and the original Lumina
training config, with its field names, roots and ratios; entries without an image or caption are kept for counting."""

import json
import random

import pytest

from mindone_lumina.training.sources import read_items


def test_every_format_in_one_list_with_running_ids(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "captions.jsonl").write_text(
        json.dumps({"image": "a.png", "caption": "a red circle"}) + "\n\n" + json.dumps({"image": "b.png"}) + "\n"
    )
    (tmp_path / "list.json").write_text(json.dumps([
        {"path": "/data/c.jpg", "prompt": "a cat"},
        {"image": "d.jpg", "conversations": [{"from": "human", "value": "draw"}, {"from": "gpt", "value": "a dog"}]},
        {"image_path": "e.jpg", "gpt_4_caption": "  "},
        {"caption": "no image"},
    ]))  # fmt: skip
    items = read_items([str(tmp_path / "folder"), str(tmp_path / "list.json")])
    assert [i.id for i in items] == [str(n) for n in range(6)]
    assert [(i.image, i.caption) for i in items] == [
        (str(tmp_path / "folder" / "a.png"), "a red circle"),
        (str(tmp_path / "folder" / "b.png"), None),  # missing caption: skipped and counted by the extraction
        ("/data/c.jpg", "a cat"),
        (str(tmp_path / "d.jpg"), "a dog"),
        (str(tmp_path / "e.jpg"), None),  # blank caption
        (None, "no image"),
    ]


def test_the_original_lumina_config_with_root_and_ratio(tmp_path):
    rows = [{"image": f"{n}.png", "prompt": f"caption {n}"} for n in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows[:3]))
    (tmp_path / "data.yaml").write_text(
        "META:\n  - path: a.jsonl\n    type: photos\n    ratio: 0.5\n  - path: b.json\n    type: art\n    root: /imgs\n"
    )
    items = read_items(str(tmp_path / "data.yaml"))
    kept = random.Random(0).sample(rows, 10)  # the original's choice
    assert [i.caption for i in items[:10]] == [r["prompt"] for r in kept]
    assert [i.image for i in items[10:]] == ["/imgs/0.png", "/imgs/1.png", "/imgs/2.png"]


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "does not exist"),
    ("bad.jsonl", '{"image": "a"}\n{oops\n', "bad.jsonl line 2: not JSON"),
    ("dict.json", '{"image": "a"}', "holds a JSON dict, expected a list"),
    ("rows.json", '[1]', "entry 0: an entry is a JSON object, got int"),
    ("list.txt", "a.png", "unknown list format"),
    ("c.yaml", "META: [{type: x}]", "META entry 0 needs a string 'path'"),
    ("d.yaml", "- a", "a data config is a mapping of keys to values, got list"),
])  # fmt: skip
def test_bad_sources_name_the_file_and_problem(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_items(str(tmp_path / name))
