"""The command-line tools treat their user and their files with care (``mindone_lumina/cli.py``, issue #24): every
argument is checked before a model is loaded and a bad one is a one-line error with exit status 2, images never
overwrite earlier ones unless asked, ``--out FILE.png`` writes that file, files get the user's umask, SIGTERM leaves
no partial file, every flag's help names its default, and a run prints no notice a user cannot act on.

Sampling runs use the bundled model (its size is read here, not assumed: it is retrained from time to time) at two
Euler grid points in PyNative mode, so that each takes a few seconds."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import load_tool
from PIL import Image

from mindone_lumina import atomic, cli, components
from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "tools")) if name.endswith(".py"))
FAST = ["--steps", "2", "--solver", "euler", "--mode", "pynative"]
PROMPTS = ["a large red circle in the center on a blue background", "a small green square in the top left"]


def _read(*parts) -> dict:
    with open(os.path.join(DEFAULT_MODEL, *parts)) as f:
        return json.load(f)


# the bundled model's size multiple, patch size x VAE downsampling (2 ** (levels - 1)), and its training size
MULTIPLE = _read("transformer", "config.json")["patch_size"] * 2 ** (
    len(_read("vae", "config.json")["block_out_channels"]) - 1
)
TRAIN_SIZE = _read("mindone_lumina.json")["train_size"]


@pytest.fixture(scope="module")
def tools():
    return {name: load_tool(name) for name in TOOLS}


def run(tool, argv, capsys):
    """(exit status, stdout, stderr) of ``tool`` run as its command (``cli.run``), in this process."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(tool.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_one_line_error(code, err, tool: str, message: str):
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{tool}.py: error: ") and message in err, err


@pytest.fixture
def no_loading(monkeypatch):
    """Every way a tool loads a model fails the test: an error seen with this fixture came before any loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_transformer", "load_text_encoder", "load_tokenizer", "load_vae", "build_transformer"):
        monkeypatch.setattr(components, name, refuse)
    monkeypatch.setattr(TextToImagePipeline, "from_pretrained", classmethod(refuse))


@pytest.fixture
def files(tmp_path):
    """Paths the bad command lines below name: {tmp}, a plain {file}, a {nonempty} folder, a {pngdir} holding
    0000.png, a latents {npz}, a {recipe} and a {vae_recipe} over a {data} folder."""
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("x")
    (tmp_path / "pngdir").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pngdir" / "0000.png")
    np.savez(tmp_path / "z.npz", latents=np.zeros((1, 4, 2, 2), np.float32))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a"}) + "\n")
    encoder, vae = os.path.join(DEFAULT_MODEL, "text_encoder"), os.path.join(DEFAULT_MODEL, "vae")
    recipe = {"data": str(tmp_path / "data"), "output": str(tmp_path / "run"), "resolution": TRAIN_SIZE,
              "text_encoder": encoder, "vae": vae}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    vae_recipe = {"data": str(tmp_path / "data"), "output": str(tmp_path / "run"), "resolution": 32,
                  "bucket_multiple": 8, "vae": {"block_out_channels": [8, 8], "norm_num_groups": 8}}  # fmt: skip
    (tmp_path / "vae-recipe.yaml").write_text(yaml.safe_dump(vae_recipe))
    names = {"tmp": tmp_path, "file": tmp_path / "file.txt", "nonempty": tmp_path / "nonempty", "vae_recipe":
             tmp_path / "vae-recipe.yaml", "pngdir": tmp_path / "pngdir", "npz": tmp_path / "z.npz",
             "recipe": tmp_path / "recipe.yaml", "data": tmp_path / "data", "model": DEFAULT_MODEL,
             "vae": vae, "encoder": encoder}  # fmt: skip
    return {k: str(v) for k, v in names.items()}


# ------------------------------------------------------------------------------------------------------------------
# Bad arguments: one line, exit status 2, before any model is loaded
# ------------------------------------------------------------------------------------------------------------------
M = MULTIPLE
SEED = f"0..{2**32 - 1}"
R = f"--resolution {M + 1}x{M}: width and height must be multiples of {M}"
NUMBER = "must be a finite number"
# (tool, argv, what the one line says); "{name}" is filled in from the files fixture
# fmt: off
BAD = [
    ("sample", ["--resolution", f"{M + 1}x{M}"], R),
    ("sample", ["--resolution", f"{M}x{M // 2}"], f"must be multiples of {M} (patch size"),
    ("sample", ["--resolution", "0x32"], "argument --resolution: width and height must be positive, got 0x32"),
    ("sample", [f"--resolution=-{M}x{M}"], f"must be positive, got -{M}x{M}"),
    ("sample", ["--resolution", "32by32"], "argument --resolution: expected WIDTHxHEIGHT in pixels"),
    ("sample", ["--seed", "-1"], f"argument --seed: must be an integer in {SEED}, got -1"),
    ("sample", ["--seed", str(2**32)], f"argument --seed: must be an integer in {SEED}, got {2**32}"),
    ("sample", ["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    ("sample", ["--steps", "0"], "argument --steps: must be an integer >= 2, got 0"),
    ("sample", ["--steps", "1"], "argument --steps: must be an integer >= 2, got 1"),
    ("sample", ["--cfg", "-0.5"], f"argument --cfg: {NUMBER} >= 0, got -0.5"),
    ("sample", ["--cfg", "nan"], f"argument --cfg: {NUMBER} >= 0, got nan"),
    ("sample", ["--shift", "0"], f"argument --shift: {NUMBER} > 0, got 0"),
    ("sample", ["--watershed", "1.5"], f"argument --watershed: {NUMBER} in 0..1, got 1.5"),
    ("sample", ["--solver", "heun"], "argument --solver: invalid choice: 'heun'"),
    ("sample", ["--context-drop", "0"], "argument --context-drop: must be an integer >= 1, got 0"),
    ("sample", ["--context-drop-until", "1.5"], f"argument --context-drop-until: {NUMBER} in 0..1, got 1.5"),
    ("sample", ["--context-drop-layers", "2-1"], "argument --context-drop-layers: range '2-1' runs backwards"),
    ("sample", ["--context-drop-layers", "odd"], "argument --context-drop-layers: expected 'all' or layer indices"),
    ("sample", ["--model", "{tmp}/no-such-model"], "{tmp}/no-such-model does not exist"),
    ("sample", ["--out", "{file}"], "--out {file} is an existing file, not a folder"),
    ("sample", ["--out", "{file}/sub"], "--out {file}/sub cannot be written: {file} is a file, not a folder"),
    ("sample", ["--out", "{tmp}/picture.jpg"], "images are written as PNG; name a .png file or a folder"),
    ("sample", ["--prompt", "a", "b", "--out", "{tmp}/p.png"], "names one image, but 2 prompts were given"),
    ("sample", ["--out", "{pngdir}/0000.png"], "--out {pngdir}/0000.png already exists; pass --overwrite"),
    ("sample", ["--save-latents", "{pngdir}"], "--save-latents {pngdir} is a folder; expected a file name"),
    ("sample", ["--latents", "{tmp}/none.npz"], "--latents {tmp}/none.npz does not exist"),
    ("sample", ["--latents", "{file}"], "--latents {file}: not a readable npz file"),
    ("sample", ["--prompts-file", "{tmp}/none.txt"], "--prompts-file {tmp}/none.txt: cannot read it"),
    ("sample", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("sample", ["--lora", "{tmp}/none"], "--lora {tmp}/none does not exist"),
    ("sample", ["--lora", "{nonempty}"], "LoRA {nonempty}: no adapter weights {nonempty}/adapter_model.safetensors"),
    ("sample", ["--lora-scale", "0.5"], "--lora-scale given without --lora"),
    ("sample", ["--lora", "{nonempty}", "--lora", "{nonempty}", "--lora-scale", "1", "--lora-scale", "2",
                "--lora-scale", "3"], "--lora-scale: give one scale for all or one per --lora (2), got 3"),
    ("convert", ["{tmp}/none.safetensors", "{tmp}/o.safetensors"], "SRC {tmp}/none.safetensors does not exist"),
    ("convert", ["{npz}", "{file}"], "output {file} for the mindspore format must be a .safetensors file path"),
    ("convert", ["{npz}", "{tmp}/o.safetensors", "--merge-lora", "{tmp}/none"],
     "--merge-lora {tmp}/none does not exist"),
    ("forward", ["--checkpoint", "{tmp}/none", "--inputs", "{npz}", "--output", "{tmp}/o.npz"],
     "--checkpoint {tmp}/none does not exist"),
    ("forward", ["--checkpoint", "{npz}", "--inputs", "{npz}", "--output", "o.npz", "--scale-watershed", "2"],
     f"argument --scale-watershed: {NUMBER} in 0..1, got 2"),
    ("forward", ["--checkpoint", "{npz}", "--inputs", "{npz}", "--output", "{nonempty}"],
     "--output {nonempty} is a folder; expected a file name"),
    ("encode_prompts", ["--model", "{tmp}/none", "--prompts", "a", "--output", "{tmp}/o.npz"],
     "--model {tmp}/none does not exist"),
    ("encode_prompts", ["--model", "{encoder}", "--prompts", "a", "--output", "o.npz", "--max-length", "0"],
     "argument --max-length: must be an integer >= 1, got 0"),
    ("vae", ["decode", "--vae", "{vae}", "--latents", "{tmp}/none.npz", "--output", "{tmp}/x.npz"],
     "--latents {tmp}/none.npz does not exist"),
    ("vae", ["decode", "--vae", "{vae}", "--latents", "{npz}", "--output", "{pngdir}"],
     "--output {pngdir}/0000.png already exists; pass --overwrite"),
    ("vae", ["decode", "--vae", "{vae}", "--latents", "{npz}", "--output", "x.npz", "--tiled", "--tile", "1"],
     "--tile 1 --overlap 0.25: tile must be at least 2 latent pixels, got 1"),
    ("vae", ["encode", "--vae", "{vae}", "--images", "{file}", "--output", "{tmp}/z2.npz"],
     "--images {file}: cannot read the image"),
    ("vae", ["encode", "--vae", "{vae}", "--images", "{file}", "--output", "z2.npz", "--seed", "-3"],
     f"argument --seed: must be an integer in {SEED}, got -3"),
    ("make_text_encoder", ["--captions", "{file}", "--out", "{tmp}/te", "--hidden", "64", "--heads", "3"],
     "--heads 3 must divide --hidden 64"),
    ("make_text_encoder", ["--captions", "{file}", "--out", "{nonempty}"], "--out {nonempty} is a folder that is not"),
    ("make_shapes_dataset", ["--out", "{tmp}/s", "--num", "0"], "argument --num: must be an integer >= 1, got 0"),
    ("make_shapes_dataset", ["--out", "{file}", "--num", "2"], "--out {file} is an existing file, not a folder"),
    ("parity_report", ["--model", "{tmp}/none"], "--model {tmp}/none does not exist"),
    ("train", ["--config", "{recipe}", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    ("train", ["--config", "{tmp}/none.yaml"], "cannot read recipe {tmp}/none.yaml"),
    ("train", ["--config", "{recipe}", "--data", "{tmp}"], "{tmp}/captions.jsonl does not exist"),
    ("train", ["--config", "{recipe}", "--init", "{tmp}/none"], "init (--init) {tmp}/none does not exist"),
    ("train", ["--config", "{recipe}", "--export", "{nonempty}"], "--export {nonempty} is a folder that is not empty"),
    ("train", ["--config", "{recipe}", "--output", "{file}"], "output (--output) {file} is an existing file"),
    ("train_vae", ["--config", "{vae_recipe}", "--data", "{tmp}/none"], "{tmp}/none does not exist"),
]
# fmt: on


@pytest.mark.parametrize("case", BAD, ids=[f"{c[0]}:{' '.join(c[1])}" for c in BAD])
def test_bad_argument_is_one_line_before_loading(case, tools, files, no_loading, capsys):
    tool, argv, message = case
    argv = [a.format(**files) for a in argv]
    if tool == "sample":  # a valid command line but for the argument under test
        base = {"--prompt": "a", "--out": files["tmp"] + "/out", "--save-latents": files["tmp"] + "/final.npz"}
        argv = [x for flag, value in base.items() if flag not in argv for x in (flag, value)] + argv
    code, _, err = run(tools[tool], argv, capsys)
    assert_one_line_error(code, err, tool, message.format(**files))


def test_help_and_error_name_the_same_multiple(tools):
    """The number --help gives for the bundled model is the one the resolution check enforces."""
    text = " ".join(tools["sample"].parser().format_help().split())
    assert f"({M} for the bundled model" in text and "16 for Lumina-Next" in text


def test_debug_shows_the_traceback(tools, files, no_loading, capsys):
    code, _, err = run(tools["sample"], ["--prompt", "a", "--seed", "-1", "--debug"], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("got -1 (see --help)")


def test_real_process_error_is_one_line_and_comes_before_loading(tmp_path):
    """In a real process, on a model whose weights are truncated: a bad --resolution is the one line and exit 2 (it
    came before loading, which would have failed); the same command with a good size fails when loading, also in
    one line, naming the file and what is wrong with it."""
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_MODEL, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    command = [sys.executable, os.path.join(ROOT, "tools", "sample.py"), "--model", str(broken), "--prompt", "a",
               "--out", str(tmp_path / "out"), *FAST]  # fmt: skip
    bad = subprocess.run([*command, "--resolution", f"{M + 1}x{M}"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(bad.returncode, bad.stderr, "sample", f"must be multiples of {M}")
    good = subprocess.run([*command, "--resolution", f"{M}x{M}"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(good.returncode, good.stderr, "sample", f"{weights} is truncated")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# Files: no overwrite, --out FILE.png, the umask, interruptions
# ------------------------------------------------------------------------------------------------------------------
def test_slug_and_numbered_names():
    assert cli.slug(PROMPTS[0]) == "a-large-red-circle-in-the-center-on-a"  # whole words, at most 40 characters
    assert cli.slug("Ein Kreis, ROT!") == "ein-kreis-rot" and cli.slug("一个红色的圆圈") == "prompt"
    assert cli.slug("") == "empty"
    names = cli.numbered("out/000_a_seed0.png")
    assert [next(names) for _ in range(3)] == ["out/000_a_seed0.png", "out/000_a_seed0_2.png", "out/000_a_seed0_3.png"]


def test_write_new_never_replaces_a_file_that_appears_meanwhile(tmp_path):
    """A name taken between the check and the rename (another run) is not replaced: the next number is used, or,
    for a name the user gave, FileExistsError; no temporary stays either way."""
    target = tmp_path / "a.png"

    def write_and_race(tmp):
        with open(tmp, "w") as f:
            f.write("new")
        if not target.exists():
            target.write_text("theirs")

    assert cli.write_new(str(target), write_and_race) == str(tmp_path / "a_2.png")
    assert target.read_text() == "theirs" and (tmp_path / "a_2.png").read_text() == "new"
    with pytest.raises(FileExistsError, match="exists already, not replaced"):
        cli.write_new(str(target), lambda tmp: None, counter=False)
    assert cli.write_new(str(target), lambda tmp: open(tmp, "w").write("mine"), overwrite=True) == str(target)
    assert target.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["a.png", "a_2.png"]


def test_images_never_overwrite_earlier_ones_unless_asked(tools, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--prompt", *PROMPTS, "--seed", "7", "--out", out, *FAST]
    assert run(tools["sample"], argv, capsys)[0] == 0
    first = [f"{i:03d}_{cli.slug(p)}_seed7.png" for i, p in enumerate(PROMPTS)]
    assert sorted(os.listdir(out)) == first
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_ino) for name in first}
    code, stdout, _ = run(tools["sample"], argv, capsys)  # the same run again: new names
    second = [name.replace(".png", "_2.png") for name in first]
    assert code == 0 and sorted(os.listdir(out)) == sorted(first + second)
    assert all(f"wrote {out / name}" in stdout for name in second)
    assert all(((out / n).read_bytes(), (out / n).stat().st_ino) == before[n] for n in first)  # untouched
    assert (out / second[0]).read_bytes() == before[first[0]][0]  # same seed, same image
    assert run(tools["sample"], [*argv, "--overwrite"], capsys)[0] == 0  # replaces the first names, adds none
    assert sorted(os.listdir(out)) == sorted(first + second)
    assert all((out / n).stat().st_ino != before[n][1] for n in first)


def test_out_png_writes_exactly_that_file_with_every_setting(tools, tmp_path, monkeypatch, capsys):
    target = tmp_path / "picture.png"
    argv = ["--prompt", PROMPTS[0], "--seed", "3", "--out", target, "--cfg", "2.5", *FAST]
    code, stdout, _ = run(tools["sample"], argv, capsys)
    assert code == 0 and stdout.strip() == f"wrote {target}" and os.listdir(tmp_path) == ["picture.png"]
    image = Image.open(target)
    settings = json.loads(image.text["settings"])
    assert image.size == (TRAIN_SIZE, TRAIN_SIZE) == (settings["width"], settings["height"])
    assert image.text["prompt"] == PROMPTS[0] and image.text["seed"] == "3" and image.text["model"] == DEFAULT_MODEL
    assert image.text["dtype"] == "fp32" and image.text["negative_prompt"] == ""
    assert (settings["num_steps"], settings["solver"], settings["guidance_scale"]) == (2, "euler", 2.5)
    assert {"schedule", "shift", "scaling", "scale_watershed", "proportional_attn"} <= set(settings)
    with monkeypatch.context() as patch:  # taken: refused before the model is loaded
        patch.setattr(TextToImagePipeline, "from_pretrained", None)
        code, _, err = run(tools["sample"], argv, capsys)
    assert_one_line_error(code, err, "sample", f"--out {target} already exists; pass --overwrite to replace it")
    inode = target.stat().st_ino
    assert run(tools["sample"], [*argv, "--overwrite"], capsys)[0] == 0
    assert target.stat().st_ino != inode and os.listdir(tmp_path) == ["picture.png"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_get_the_users_umask(tools, tmp_path, mask, mode, capsys):
    previous = os.umask(mask)
    try:
        assert atomic.umask() == mask
        if mask == 0o022:  # one sampling run; the umask arithmetic is the same for any mask
            argv = ["--prompt", PROMPTS[1], "--out", tmp_path / "out", "--save-latents", tmp_path / "z.npz", *FAST]
            assert run(tools["sample"], argv, capsys)[0] == 0
            (png,) = os.listdir(tmp_path / "out")
            assert os.stat(tmp_path / "out" / png).st_mode & 0o777 == mode
            assert os.stat(tmp_path / "z.npz").st_mode & 0o777 == mode
        with atomic.atomic_path(str(tmp_path / "plain.bin")) as tmp:
            assert os.stat(tmp).st_mode & 0o777 == 0o600  # private while it is being written
        assert os.stat(tmp_path / "plain.bin").st_mode & 0o777 == mode
    finally:
        os.umask(previous)


DRIVER = """
import importlib.util, os, sys, time
import PIL.Image
from mindone_lumina import cli

saved, original = [], PIL.Image.Image.save

def save(self, fp, *args, **kwargs):  # the second image: written under its temporary name, then a long pause
    original(self, fp, *args, **kwargs)
    saved.append(fp)
    if len(saved) == 2:
        open(os.environ["MARKER"], "w").close()
        time.sleep(120)

PIL.Image.Image.save = save
spec = importlib.util.spec_from_file_location("sample", os.environ["TOOL"])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
cli.run(tool.main)
"""


def test_sigterm_keeps_finished_images_and_removes_the_partial_one(tmp_path):
    """A run of three prompts killed by SIGTERM while its second PNG is being written: the first stays, the
    temporary file of the second is removed, the third never starts; exit status 128 + 15."""
    driver, marker, out = tmp_path / "driver.py", tmp_path / "writing", tmp_path / "out"
    driver.write_text(DRIVER)
    env = {**os.environ, "MARKER": str(marker), "TOOL": os.path.join(ROOT, "tools", "sample.py")}
    prompts = [*PROMPTS, "a tiny blue triangle"]
    proc = subprocess.Popen([sys.executable, str(driver), "--prompt", *prompts, "--out", str(out), *FAST], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.communicate(timeout=30)
        assert len(os.listdir(out)) == 2  # the first image and the second's temporary
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.rstrip().endswith("sample.py: interrupted (SIGTERM)"), stderr
    first = f"000_{cli.slug(prompts[0])}_seed0.png"
    assert os.listdir(out) == [first] and stdout.strip() == f"wrote {out / first}"
    assert Image.open(out / first).size == (TRAIN_SIZE, TRAIN_SIZE)


def test_training_on_bad_data_leaves_no_cache_folder(tools, files, tmp_path, capsys):
    """Unreadable images fail the run after the text encoder and VAE are loaded (reading them is what shows they
    are bad): one line with the counts, and no run folder or empty cache/ left behind."""
    data = tmp_path / "data"
    (data / "0.png").write_bytes(b"not a png")
    code, _, err = run(tools["train"], ["--config", files["recipe"]], capsys)
    message = f"none of the 1 items of {data} can be trained on (skipped: {{'unreadable': 1}})"
    assert_one_line_error(code, err, "train", message)
    assert not (tmp_path / "run").exists()


def test_convert_names_a_truncated_checkpoint(tools, tmp_path, capsys):
    source = os.path.join(DEFAULT_MODEL, "transformer", "diffusion_pytorch_model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(source, "rb").read()[:-1000])
    code, _, err = run(tools["convert"], [cut, tmp_path / "out.safetensors"], capsys)
    assert_one_line_error(code, err, "convert", f"{cut} is truncated: its header describes")
    assert os.listdir(tmp_path) == ["cut.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: an unreadable checkpoint cannot be made")
def test_convert_names_an_unreadable_checkpoint(tools, tmp_path, capsys):
    locked = tmp_path / "locked.safetensors"
    shutil.copy(os.path.join(DEFAULT_MODEL, "transformer", "diffusion_pytorch_model.safetensors"), locked)
    locked.chmod(0)
    code, _, err = run(tools["convert"], [locked, tmp_path / "out.safetensors"], capsys)
    assert_one_line_error(code, err, "convert", f"cannot read checkpoint {locked}: Permission denied")


# ------------------------------------------------------------------------------------------------------------------
# --help, and a quiet run
# ------------------------------------------------------------------------------------------------------------------
def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("name", TOOLS)
def test_help_names_a_default_for_every_flag(name, tools, capsys):
    missing = []
    for parser in _parsers(tools[name].parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = cli.help_text(action)
            if not action.help or not ("default" in text.lower() or action.required):
                missing.append("/".join(action.option_strings))
    assert not missing, f"{name}: flags without a help text naming their default: {missing}"
    with pytest.raises(SystemExit) as exit_info:
        tools[name].main(["--help"])
    assert exit_info.value.code == 0 and "--debug" in capsys.readouterr().out


def test_quiet_run(tmp_path):
    """A sampling run as on a machine without PyTorch (USE_TORCH=0, what transformers checks): stdout names the
    image, stderr holds only the progress bar; transformers' "None of PyTorch, TensorFlow >= 2.0, or Flax have been
    found" notice is gone."""
    env = {**os.environ, "USE_TORCH": "0"}
    command = [sys.executable, os.path.join(ROOT, "tools", "sample.py"), "--prompt", PROMPTS[0], "--out",
               str(tmp_path / "out"), *FAST]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "None of PyTorch" not in done.stderr
    noise = [line for line in re.split(r"[\r\n]+", done.stderr) if line.strip() and not line.startswith("sampling")]
    assert not noise, noise
    assert done.stdout.strip() == f"wrote {tmp_path / 'out' / ('000_' + cli.slug(PROMPTS[0]) + '_seed0.png')}"
