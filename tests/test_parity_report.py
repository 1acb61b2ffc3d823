"""tools/parity_report.py on the tiny default model: both dtypes hold their budgets, and a weight perturbed on the
MindSpore side only is caught at exactly that block."""

import numpy as np
import pytest
from conftest import load_tool

from mindspore import Tensor

from mindone_lumina import parity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return parity.build_tiny_model(str(tmp_path_factory.mktemp("parity-tiny")))


def test_both_dtypes_hold_the_budgets(tiny, tmp_path):
    """fp32 and fp16 in PyNative; the report's graph-mode rows are those of ``test_untied_diffusers_model_passes``
    (fp32), and tools/selfcheck.py compares every component in graph mode in both dtypes (tests/test_selfcheck.py)."""
    out = tmp_path / "report"
    code = load_tool("parity_report").main(["--model", tiny, "--modes", "pynative", "--out", str(out)])
    text = (out / "report.md").read_text()
    assert code == 0 and "**Overall: PASS**" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| fp")]
    assert {(r[0].strip(), r[1].strip()) for r in rows} == {(d, "pynative") for d in parity.DTYPES}
    # 4 blocks + gemma + vae + 6 steps per (dtype, mode); every row within its stated budget
    assert len(rows) == 2 * 12
    assert all(float(r[3]) <= float(r[5]) and r[6].strip() == "PASS" for r in rows)
    assert (out / "errors_blocks.png").stat().st_size > 0 and (out / "errors_steps.png").stat().st_size > 0


def test_perturbed_weight_fails_at_its_block(tiny, tmp_path):
    def perturb(ours):
        wo = ours.transformer.layers[1].attention.wo.weight
        noise = np.random.default_rng(0).standard_normal(wo.shape).astype(np.float32) * 1e-3
        wo.set_data(wo + Tensor(noise).astype(wo.dtype))

    report = parity.run(tiny, ["fp32"], ["pynative"], str(tmp_path), perturb=perturb)
    assert not report.passed
    assert report.first_failure("block") == 1
    assert report.first_failure("gemma") is None and report.first_failure("vae") is None
    assert "FAIL" in (tmp_path / "report.md").read_text()


def test_cli_exit_code_and_bad_arguments(tiny, tmp_path, monkeypatch):
    tool = load_tool("parity_report")
    monkeypatch.setitem(parity.BUDGETS, "fp32", dict(parity.BUDGETS["fp32"], sampling=0.0))
    assert tool.main(["--model", tiny, "--dtypes", "fp32", "--modes", "pynative", "--out", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match="unknown or empty dtypes/modes"):
        tool.main(["--model", tiny, "--dtypes", "bf8", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not a diffusers-layout folder"):
        tool.main(["--model", str(tmp_path), "--out", str(tmp_path)])


def test_untied_diffusers_model_passes(tmp_path):
    """A diffusers model whose attn2 query differs from attn1's (as diffusers trains it) loads with its own
    cross-attention query and holds every fp32 budget; the loader used to refuse it."""
    model = parity.build_tiny_model(str(tmp_path / "untied"), num_layers=2, tied_queries=False)
    report = parity.run(model, ["fp32"], ["graph"], str(tmp_path / "report"))
    assert report.passed and len(report.select("block")) == 2
