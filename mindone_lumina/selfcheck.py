"""The self-check: every component of the port against the golden bundle (``golden.py``) on the device at hand, the
kernel contracts (``kernel_contracts.py``), and the speed of one Next-DiT evaluation. No torch needed.

Each check loads its component from the bundle in a dtype, runs it in the current execution mode (the tool sets
graph mode) on the current device, so an Ascend run goes through the fused kernels (``backend.use_fused_kernels``),
and compares with the fp32 PyTorch reference stored in the bundle: the relative Frobenius error against the budget of
``tolerances.BUDGETS`` for that dtype. A row that raises counts as a failure with the error as its detail.
"""

import resource
import time
import traceback
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor

from . import backend, components, kernel_contracts
from .dtypes import ms_dtype
from .golden import FLAGDIT, Bundle
from .models import flagdit, nextdit
from .parity import errors
from .pipeline import SampleSettings, TextToImagePipeline
from .tolerances import budget
from .training.step import FlowMatchingLoss
from .weights.load import empty, load_specs, param_shapes, random_specs

COMPONENTS = ("contracts", "nextdit", "flagdit", "gemma", "vae", "sampling", "training")
BUDGET_OF = {"nextdit": "transformer", "flagdit": "transformer", "gemma": "text_encoder", "vae": "vae",
             "sampling": "sampling", "training": "training"}  # fmt: skip
SPEED_ARCHS = ("nextdit-2b-gqa", "golden")  # the released 2B shape, or the bundle's tiny Next-DiT at the same size


@dataclass(frozen=True)
class Row:
    component: str
    case: str
    dtype: str
    error: float  # relative Frobenius error against the reference (NaN: did not run)
    budget: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.budget)  # NaN fails


def rel_error(actual, reference) -> float:
    return errors(actual, reference)[0]


def run(bundle: Bundle, dtypes=("fp32",), parts=COMPONENTS, real_kernels: bool | None = None) -> list:
    """All rows of ``parts`` in every dtype (the kernel contracts once: they fix their own dtypes)."""
    rows = []
    if "contracts" in parts:
        real = backend.use_fused_kernels() if real_kernels is None else real_kernels
        rows += _guarded("contracts", "all", "-", lambda: _contract_rows(real))
    for dtype in dtypes:
        for part in parts:
            if part != "contracts":
                rows += _guarded(part, "all", dtype, lambda part=part, dtype=dtype: CHECKS[part](bundle, dtype))
    return rows


def _guarded(component: str, case: str, dtype: str, check) -> list:
    """The rows of ``check()``, or one failed row naming the exception (a crash is a result, not an abort)."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - every failure becomes a reported row
        line = traceback.format_exception_only(type(e), e)[-1].strip()
        return [Row(component, case, dtype, float("nan"), 0.0, line[:300])]


def _contract_rows(real: bool) -> list:
    return [Row("contracts", f"{r.kernel}: {r.case}", "-", r.error, r.budget) for r in kernel_contracts.check(real)]


def _tensors(dtype, *arrays):
    """Float arrays in ``dtype``, integer arrays as they are."""
    return [Tensor(a).astype(dtype) if a.dtype.kind == "f" else Tensor(a) for a in arrays]


def check_nextdit(bundle: Bundle, dtype: str) -> list:
    dt = ms_dtype(dtype)
    model = components.load_transformer(bundle.path("transformer"), dt)
    rows = []
    for case, s in sorted(bundle.manifest["cases"]["nextdit"].items()):
        io = bundle.case(f"nextdit/{case}")
        scaling = nextdit.RopeScaling(s["scale_factor"], s["scale_watershed"], base_seqlen=s["base_seqlen"])
        x, t, cap, mask = _tensors(dt, io["x"], io["t"], io["cap_feats"], io["cap_mask"])
        out = nextdit.forward(model, x, t.astype(ms.float32), cap, mask, scaling)
        rows.append(_row("nextdit", case, dtype, out, io["out"]))
    return rows


def check_flagdit(bundle: Bundle, dtype: str) -> list:
    dt = ms_dtype(dtype)
    model = components.load_transformer(bundle.path(FLAGDIT), dt)
    io = bundle.case("flagdit/plain")
    x, t, cap, mask = _tensors(dt, io["x"], io["t"], io["cap_feats"], io["cap_mask"])
    return [_row("flagdit", "plain", dtype, flagdit.forward(model, x, t.astype(ms.float32), cap, mask), io["out"])]


def check_gemma(bundle: Bundle, dtype: str) -> list:
    """``hidden_states[-2]`` on the real (unpadded) tokens."""
    encoder = components.load_text_encoder(bundle.path("text_encoder"), ms_dtype(dtype))
    io = bundle.case("gemma/plain")
    out = encoder(Tensor(io["input_ids"]), Tensor(io["attention_mask"])).astype(ms.float32).asnumpy()
    valid = io["attention_mask"].astype(bool)  # (B, L)
    return [Row("gemma", "plain", dtype, rel_error(out[valid], io["hidden"][valid]), budget(dtype, "text_encoder"))]


def check_vae(bundle: Bundle, dtype: str) -> list:
    dt = ms_dtype(dtype)
    vae = components.load_vae(bundle.path("vae"), dt)
    io = bundle.case("vae/plain")
    return [_row("vae", "plain", dtype, vae.decode(Tensor(io["latent"]).astype(dt)), io["image"])]


def check_sampling(bundle: Bundle, dtype: str) -> list:
    """The latent after every Euler step of the whole pipeline (tokenizer, Gemma, Next-DiT with guidance), on the
    reference's own time grid; its RoPE settings (``scaling="always"``, watershed 1) are diffusers'."""
    s = bundle.manifest["cases"]["sampling"]
    io = bundle.case("sampling/plain")
    pipe = TextToImagePipeline.from_pretrained(bundle.path(), dtype=dtype)
    settings = SampleSettings(height=s["height"], width=s["width"], solver="euler", guidance_scale=s["guidance_scale"],
                              scaling="always", scale_watershed=1.0)  # fmt: skip
    steps = []
    pipe(s["prompts"], s["negative_prompt"], latents=io["noise"], grid=io["grid"], settings=settings, progress=False,
         callback=lambda i, t, x: steps.append(x.astype(ms.float32).asnumpy()))  # fmt: skip
    if len(steps) != len(io["steps"]):
        raise ValueError(f"{len(steps)} solver steps, the reference took {len(io['steps'])}")
    return [Row("sampling", f"step {i + 1}", dtype, rel_error(a, r), budget(dtype, "sampling"))
            for i, (a, r) in enumerate(zip(steps, io["steps"]))]  # fmt: skip


def check_training(bundle: Bundle, dtype: str) -> list:
    """One flow-matching loss and every parameter's gradient (graph mode compiles ``value_and_grad``), with the
    training recipes' mixed precision: fp32 weights, fp16/bf16 compute (``Cell.to_float``), no loss scale. Gradient
    errors are relative to the larger of the reference gradient's norm and 1e-3 of the largest gradient norm, so an
    almost-zero gradient (the padding token's) is judged on the model's scale; the row reports the worst tensor."""
    model = components.load_transformer(bundle.path("transformer"))
    if dtype != "fp32":
        model.to_float(ms_dtype(dtype))
    io = bundle.case("training/plain")
    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    grad_fn = ms.value_and_grad(FlowMatchingLoss(model), None, [p for _, p in named])
    if ms.get_context("mode") == ms.GRAPH_MODE:
        grad_fn = ms.jit(grad_fn)
    x1, x0, t, cap, mask = _tensors(ms.float32, io["x1"], io["x0"], io["t"], io["cap_feats"], io["cap_mask"])
    h, w = io["x1"].shape[2:]
    loss, grads = grad_fn(x1, x0, t, cap, mask, *nextdit.rope_inputs(model.cfg, h, w, 1.0))
    limit = budget(dtype, "training")
    ref_loss = float(io["loss"])
    rows = [Row("training", "loss", dtype, abs(float(loss) - ref_loss) / abs(ref_loss), limit)]
    refs = {name: io[f"grad/{name}"] for name, _ in named}
    floor = 1e-3 * max(np.linalg.norm(g.astype(np.float64)) for g in refs.values())
    worst, worst_name = 0.0, ""
    for (name, _), grad in zip(named, grads):
        ref = refs[name].astype(np.float64)
        err = np.linalg.norm(grad.astype(ms.float32).asnumpy() - ref) / max(np.linalg.norm(ref), floor)
        if not err <= worst:  # NaN is kept
            worst, worst_name = float(err), name
    rows.append(Row("training", f"gradients ({len(named)})", dtype, worst, limit, f"worst: {worst_name}"))
    return rows


CHECKS = {"nextdit": check_nextdit, "flagdit": check_flagdit, "gemma": check_gemma, "vae": check_vae,
          "sampling": check_sampling, "training": check_training}  # fmt: skip


def _row(component: str, case: str, dtype: str, out, reference) -> Row:
    actual = out.astype(ms.float32).asnumpy()
    return Row(component, case, dtype, rel_error(actual, reference), budget(dtype, BUDGET_OF[component]))


# ------------------------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    arch: str
    runner: str  # "whole-model graph" or "shared-block runner" (CPU graph mode, as the pipeline runs it)
    dtype: str
    tokens: int
    batch: int
    compile_s: float  # first call minus a steady call
    eval_s: float  # median of the steady calls
    memory_gb: float
    memory_kind: str  # "device peak" (Ascend) or "host peak RSS" (CPU)


def speed(bundle: Bundle, arch: str, dtype: str, size: int = 1024, repeats: int = 3, caption: int = 128) -> Speed:
    """Seconds per Next-DiT evaluation on a ``size``² image (batch 2: one guided step's pair), random weights."""
    if arch not in SPEED_ARCHS:
        raise ValueError(f"speed arch must be one of {SPEED_ARCHS}, got {arch!r}")
    dt = ms_dtype(dtype)
    backend.check_dtype_supported(dt)
    if not backend.is_cpu():
        ms.runtime.reset_peak_memory_stats()  # the device peak of this timing, not of the checks before it
    cfg = components.dit_config(bundle.path("transformer")) if arch == "golden" else nextdit.resolve_config(arch)
    model = empty(nextdit.NextDiT, cfg)
    load_specs(model, random_specs(param_shapes(model), 1.0), "random weights", dt)
    if backend.is_cpu() and ms.get_context("mode") == ms.GRAPH_MODE:
        # as the pipeline samples on CPU: the whole 2B graph at 4096 tokens does not fit 24 GiB (measured: killed)
        model = nextdit.SharedBlockNextDiT(model)
    rng = np.random.default_rng(0)
    side = size // 8
    x = Tensor(rng.standard_normal((2, cfg.in_channels, side, side), dtype=np.float32)).astype(dt)
    cap = Tensor(rng.standard_normal((2, caption, cfg.cap_feat_dim), dtype=np.float32)).astype(dt)
    mask = np.ones((2, caption), np.int32)
    mask[1, caption // 2 :] = 0
    args = (x, Tensor(np.full(2, 0.5, np.float32)), cap, Tensor(mask), *nextdit.rope_inputs(cfg, side, side, 0.5))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(*args).asnumpy()
        times.append(time.perf_counter() - start)
    steady = float(np.median(times[1:]))
    memory, kind = _peak_memory()
    tokens = (side // cfg.patch_size) ** 2
    runner = "shared-block runner" if isinstance(model, nextdit.SharedBlockNextDiT) else "whole-model graph"
    return Speed(arch, runner, dtype, tokens, 2, max(times[0] - steady, 0.0), steady, memory, kind)


def _peak_memory() -> tuple:
    if backend.is_cpu():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host peak RSS"
    return ms.runtime.max_memory_allocated() / 2**30, "device peak"


# ------------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------------
def table(rows: list) -> str:
    lines = ["| component | case | dtype | error | budget | result | detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.component} | {r.case} | {r.dtype} | {r.error:.3e} | {r.budget:.2g} | "
                     f"{'PASS' if r.passed else 'FAIL'} | {r.detail} |")  # fmt: skip
    return "\n".join(lines)


def speed_table(results: list, device: str, command: str) -> str:
    """The format of ``benchmarks/README.md``'s summary: benchmark, what, command, figure."""
    lines = ["| benchmark | what | command | device | s / evaluation | compile s | memory |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in results:
        what = f"{s.arch} ({s.runner}), random weights, {s.dtype}, batch {s.batch} x {s.tokens} image tokens"
        lines.append(f"| Next-DiT forward | {what} | `{command}` | {device} | {s.eval_s:.3f} | {s.compile_s:.1f} | "
                     f"{s.memory_gb:.2f} GiB {s.memory_kind} |")  # fmt: skip
    return "\n".join(lines)
