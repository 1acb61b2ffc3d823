"""tools/selfcheck.py and the golden bundle (issue #29): the self-check passes on CPU against the shipped bundle, fails
naming the component when one golden tensor is perturbed, refuses bad arguments before any work; tools/make_golden.py
regenerates the shipped bundle bit for bit."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import load_tool

from mindone_lumina import golden, selfcheck
from mindone_lumina.weights.safetensors import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tool = load_tool("selfcheck")


def test_passes_on_cpu_against_the_shipped_bundle(tmp_path, capsys):
    """Every component in fp32 through the tool, and the fp16 training step (fp16 compute over fp32 weights: the
    self-check's own path). The fp16 forward rows pass too (2.0e-3 to 5.5e-3, tools/selfcheck.py's default run on CPU);
    each component's fp16 parity is tested in its own file and the sampling steps' by test_parity_report, so the
    suite does not run them twice."""
    out = tmp_path / "report.md"
    status = tool.main(["--dtypes", "fp32", "--speed", "golden", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = out.read_text()
    assert report == printed
    for component in selfcheck.COMPONENTS:
        assert f"| {component} |" in report, component
    for case in ("plain", "pi", "ntk", "step 3", "loss", "gradients (61)"):
        assert f"| {case} |" in report, case
    assert "FAIL" not in report
    half = selfcheck.run(golden.Bundle(golden.SHIPPED), ("fp16",), ("training",))
    assert [r.case for r in half] == ["loss", "gradients (61)"] and all(r.passed for r in half), half
    speed = "| Next-DiT forward | golden (shared-block runner), random weights, fp32, batch 2 x 4096 image tokens |"
    assert speed in report
    assert report.rstrip().endswith("rows within budget)") and "\nPASS (" in report


def _perturbed_copy(tmp_path, key: str) -> str:
    """The shipped bundle with tensor ``key`` changed by 1e-3 of its norm in one element."""
    folder = tmp_path / "golden"
    shutil.copytree(golden.SHIPPED, folder)
    cases = SafetensorsFile(os.path.join(golden.SHIPPED, golden.CASES))
    arrays = {k: cases.read(k) for k in cases.keys()}
    value = arrays[key].copy()
    value.reshape(-1)[7] += 1e-3 * np.linalg.norm(value)
    arrays[key] = value
    os.remove(folder / golden.CASES)
    golden.write_cases(str(folder), arrays)
    return str(folder)


def test_fails_naming_the_component_of_a_perturbed_tensor(tmp_path, capsys):
    folder = _perturbed_copy(tmp_path, "nextdit/pi/out")
    status = tool.main(["--golden", folder, "--dtypes", "fp32", "--components", "nextdit,gemma", "--speed", "off"])
    printed = capsys.readouterr().out
    assert status == 1
    assert "FAIL: nextdit (" in printed  # the verdict names the failed component, and only it
    assert "FAIL nextdit pi fp32" in printed and "FAIL nextdit plain" not in printed
    assert "| gemma | plain | fp32 |" in printed and "FAIL gemma" not in printed


def test_a_crashing_component_is_a_failed_row_not_an_abort(tmp_path):
    folder = tmp_path / "golden"
    shutil.copytree(golden.SHIPPED, folder)
    shutil.rmtree(folder / "vae")
    rows = selfcheck.run(golden.Bundle(str(folder)), ("fp32",), ("vae", "gemma"))
    by = {r.component: r for r in rows}
    assert not by["vae"].passed and "vae" in by["vae"].detail and by["gemma"].passed


@pytest.mark.parametrize("argv, message", [
    (["--golden", "/nonexistent"], "--golden /nonexistent does not exist"),
    (["--dtypes", "fp8"], "--dtypes: unknown"),
    (["--components", "nextdit,unet"], "--components: unknown"),
    (["--dtypes", "bf16"], "bfloat16 compute is Ascend-only"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tool.main(argv + ["--speed", "off", "--out", str(tmp_path / "r.md")])
    assert not (tmp_path / "r.md").exists()


def test_shipped_bundle_regenerates():
    """Bit for bit on the machine that wrote it; elsewhere torch's kernels may round differently (within the bound)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_golden.py"), "--check"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bit-identical" in done.stdout or "the case arrays within" in done.stdout


def test_check_names_every_difference(tmp_path):
    make_golden = load_tool("make_golden")
    base = {
        "nextdit/plain/x": np.ones((2, 3), np.float32),
        "nextdit/plain/out": np.full((2, 3), 4.0, np.float32),
        "training/plain/grad/a": np.full(4, 1e-3, np.float32),
        "training/plain/grad/b": np.zeros(4, np.float32),
    }
    changed = dict(base)
    changed["nextdit/plain/out"] = base["nextdit/plain/out"] + 4.0 * 2e-6  # rounding: within the bound
    changed["training/plain/grad/b"] = np.full(4, 1e-9, np.float32)  # noise on a zero gradient, judged on a's scale
    for name, arrays in (("old", base), ("new", changed)):
        os.makedirs(tmp_path / name)
        golden.write_cases(str(tmp_path / name), arrays)
    problems, worst = make_golden.differences(str(tmp_path / "new"), str(tmp_path / "old"))
    assert problems == [] and 0 < worst <= make_golden.CHECK_RTOL
    changed["training/plain/grad/a"] = base["training/plain/grad/a"] * 1.01
    changed["nextdit/plain/x"] = np.ones((3, 2), np.float32)
    del changed["nextdit/plain/out"]
    os.remove(tmp_path / "new" / golden.CASES)
    golden.write_cases(str(tmp_path / "new"), changed)
    (tmp_path / "new" / "extra.json").write_text("{}")
    problems, _ = make_golden.differences(str(tmp_path / "new"), str(tmp_path / "old"))
    assert problems[0] == "extra.json"
    assert [p.split(": ")[1].split(" ")[0] for p in problems[1:]] == [
        "nextdit/plain/out", "nextdit/plain/x", "training/plain/grad/a"]  # fmt: skip
