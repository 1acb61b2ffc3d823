"""Flow-matching ODE sampler of Lumina-Next: time grids, fixed-step and adaptive solvers, guidance, img2img.

Time convention (written here once; every other module refers to it):
    t = 0 is pure noise and t = 1 is data. With noise x0 ~ N(0, I) and a data latent x1,
    x_t = t * x1 + (1 - t) * x0 and the target velocity is u = x1 - x0 (Lumina-T2X
    ``lumina_next_t2i_mini/transport.py``). Sampling integrates dx/dt = v(x, t) forward from t = 0 (or the
    img2img start) to t = 1.

Context Drop (``models/context_drop.py``) merges image tokens' keys and values in the model evaluations at
``t < context_drop_until``: early, where the image is still coarse (``SampleSettings.merges_at``).

Step count: ``num_steps`` means what the original's ``num_sampling_steps`` (demo "Sampling steps" slider, ``sample.py
--num_sampling_steps``) means: the number of points of the time grid, ``linspace(0, 1, num_steps)`` in
``transport.ODE``. The solver therefore takes ``num_steps - 1`` steps (the demo's "30 steps" is 29 midpoint steps,
58 model evaluations), and ``--steps 30`` here reproduces the demo's 30.

The solvers only need ``velocity(x, t: float) -> array`` and ``+``, ``-``, ``*`` on the state, so the same code runs on
NumPy arrays, MindSpore Tensors and torch tensors. Times are Python floats (float64); the state keeps its own dtype.
"""

import math
import re
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("shift", "uniform", "sigmoid")
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
TRAIN_SIZE = 1024  # training resolution of Lumina-Next-T2I (pixels per side, ~1 Mpx of any aspect ratio)


# ------------------------------------------------------------------------------------------------------------------
# Settings of a generation
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleSettings:
    """Everything ``__call__`` can vary. Defaults are the original demo's (midpoint, 30 steps, shift 4, cfg 4,
    time-aware scaled RoPE with watershed 0.3, proportional attention); a model folder may set its own."""

    height: int | None = None  # pixels; None = the model's training size
    width: int | None = None
    num_steps: int = 30  # grid points, as the original (29 midpoint steps); see sampling.py
    solver: str = "midpoint"
    schedule: str = "shift"
    shift: float = 4.0
    steepness: float = 6.0  # sigmoid schedule only
    guidance_scale: float = 4.0
    guide_all_channels: bool = False
    scaling: str = "original"  # "original": scale RoPE only beyond the training area; "always" (diffusers); "off"
    smooth_rope: bool = False  # the paper's smooth time-aware formula instead of the released hard switch
    scale_watershed: float = 0.3
    proportional_attn: bool = True
    atol: float = 1e-6  # dopri5 only
    rtol: float = 1e-3
    # Context Drop: merge n x n image tokens' keys and values (1 = off) in the evaluations at t < context_drop_until,
    # in the layers context_drop_layers names ("all", or 0-based indices and ranges such as "0-5,8"). Off by default
    # (a few percent faster on small grids); the window 0.3 kept the default model's accuracy at 1x, 2x and 4x where
    # 0.6 and 1.0 lost shapes (benchmarks/README.md, Context Drop)
    context_drop: int = 1
    context_drop_until: float = 0.3
    context_drop_layers: str = "all"

    def merges_at(self, t: float) -> bool:
        """Whether the model evaluation at time ``t`` runs with Context Drop (module docstring)."""
        return self.context_drop > 1 and t < self.context_drop_until

    def validate(self, multiple: int):
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < multiple or value % multiple):
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
        if self.num_steps < 2:
            raise ValueError(
                f"num_steps counts grid points as the original does and must be >= 2, got {self.num_steps}"
            )
        for name, valid in (("solver", SOLVERS), ("schedule", SCHEDULES),
                            ("scaling", ("original", "always", "off"))):  # fmt: skip
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        if not 0.0 <= self.scale_watershed <= 1.0:
            raise ValueError(f"scale_watershed must be in [0, 1], got {self.scale_watershed}")
        if isinstance(self.context_drop, bool) or not isinstance(self.context_drop, int) or self.context_drop < 1:
            raise ValueError(f"context_drop must be an integer >= 1 (1 = off), got {self.context_drop!r}")
        if isinstance(self.context_drop_until, bool) or not 0.0 <= self.context_drop_until <= 1.0:
            raise ValueError(f"context_drop_until must be in [0, 1], got {self.context_drop_until!r}")
        try:
            _layer_ranges(self.context_drop_layers)
        except ValueError as e:
            raise ValueError(f"context_drop_layers: {e}") from None


def context_drop_layers(spec: str, n_layers: int) -> tuple:
    """The sorted 0-based indices of the layers ``spec`` names among ``n_layers``: "all", or a comma list of indices
    and inclusive ranges such as "0-5,8". ``ValueError`` for another form or an index beyond the model's layers."""
    ranges = _layer_ranges(spec)
    if ranges is None:
        return tuple(range(n_layers))
    last = max(b for _, b in ranges)
    if last >= n_layers:
        raise ValueError(f"{spec!r} names layer {last}, but the model has {n_layers} (0-{n_layers - 1})")
    return tuple(sorted({i for a, b in ranges for i in range(a, b + 1)}))


def _layer_ranges(spec: str) -> list | None:
    """[(first, last), ...] of a layer ``spec`` ("all": None); ``ValueError`` unless well formed."""
    text = spec.replace(" ", "") if isinstance(spec, str) else ""
    if text == "all":
        return None
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise ValueError(f"expected 'all' or layer indices and ranges from 0 such as '0-5,8', got {spec!r}")
    ranges = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        ranges.append((int(first), int(last or first)))
        if ranges[-1][1] < ranges[-1][0]:
            raise ValueError(f"range {part!r} runs backwards in {spec!r}")
    return ranges


# ------------------------------------------------------------------------------------------------------------------
# Time grids
# ------------------------------------------------------------------------------------------------------------------
def time_shift(t, shift: float):
    """``t / (t + s - s t)`` (LT ``transport.py``); in sigma = 1 - t it is SD3's ``s sigma / (1 + (s - 1) sigma)``."""
    return t / (t + shift - shift * t)


def sigmoid_spacing(u, steepness: float):
    """Logistic spacing of ``u`` in [0, 1]: ``(sig(k (u - 1/2)) - sig(-k/2)) / (sig(k/2) - sig(-k/2))``.

    The slope is largest at u = 1/2, so the grid is coarse in the middle and dense at both ends; k -> 0 tends to the
    uniform grid. Exactly 0 at u = 0 and 1 at u = 1. (The paper's sigmoid schedule is not public; this is ours.)
    """

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    lo, hi = sig(-0.5 * steepness), sig(0.5 * steepness)
    return (sig(steepness * (u - 0.5)) - lo) / (hi - lo)


def time_grid(num_steps: int, schedule: str = "shift", shift: float = 4.0, steepness: float = 6.0) -> np.ndarray:
    """The sampling grid: ``num_steps`` increasing times from exactly 0 to exactly 1 (``num_steps - 1`` solver steps).

    ``num_steps`` follows the original ``ODE(num_sampling_steps)`` (LT ``transport.py``: ``linspace(0, 1, N)``).
    Schedules: ``"shift"`` the original's shifted uniform grid (``time_shift``, demo default s = 4), ``"uniform"`` the
    plain ``linspace``, ``"sigmoid"`` the logistic grid of ``sigmoid_spacing`` (``shift`` is unused by the last two).
    Returns float64 of shape (num_steps,).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"num_steps is the number of grid points and must be an integer >= 2, got {num_steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if not steepness > 0:
        raise ValueError(f"steepness must be positive, got {steepness}")
    u = np.linspace(0.0, 1.0, int(num_steps), dtype=np.float64)
    if schedule == "shift":
        t = time_shift(u, float(shift))
    elif schedule == "sigmoid":
        t = sigmoid_spacing(u, float(steepness))
    else:
        t = u
    t[0], t[-1] = 0.0, 1.0  # exact endpoints whatever the rounding
    return t


def _check_grid(grid) -> list:
    """The grid as Python floats; ValueError unless 1-D, at least 2 points and strictly increasing."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ValueError(f"grid must be a 1-D array of at least 2 times, got shape {g.shape}")
    if not np.all(np.diff(g) > 0):
        raise ValueError("grid must be strictly increasing (t = 0 noise -> t = 1 data)")
    return [float(v) for v in g]


# ------------------------------------------------------------------------------------------------------------------
# Fixed-grid solvers (torchdiffeq fixed-grid semantics, as ``odeint(..., method=...)`` in LT ``transport.py``)
# ------------------------------------------------------------------------------------------------------------------
def euler_step(velocity, x, t0: float, t1: float):
    """One explicit Euler step (torchdiffeq ``Euler``): ``x + dt v(x, t0)``; 1 evaluation."""
    return x + (t1 - t0) * velocity(x, t0)


def midpoint_step(velocity, x, t0: float, t1: float):
    """One midpoint step (torchdiffeq ``Midpoint``): ``x + dt v(x + dt/2 v(x, t0), t0 + dt/2)``; 2 evaluations."""
    dt = t1 - t0
    half = 0.5 * dt
    x_mid = x + velocity(x, t0) * half
    return x + dt * velocity(x_mid, t0 + half)


def rk4_step(velocity, x, t0: float, t1: float):
    """One classical 3/8-rule RK4 step (torchdiffeq ``RK4`` = ``rk4_alt_step_func``); 4 evaluations."""
    dt = t1 - t0
    k1 = velocity(x, t0)
    k2 = velocity(x + dt * k1 * (1 / 3), t0 + dt * (1 / 3))
    k3 = velocity(x + dt * (k2 - k1 * (1 / 3)), t0 + dt * (2 / 3))
    k4 = velocity(x + dt * (k1 - k2 + k3), t1)
    return x + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125


_STEPS = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}


def _fixed_grid(step, velocity, x, grid, callback=None, return_trajectory=False):
    """Apply ``step`` over consecutive grid times; ``callback(i, t_next, x_next)`` after step i (0-based)."""
    times = _check_grid(grid)
    trajectory = [(times[0], x)]
    for i, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
        x = step(velocity, x, t0, t1)
        if callback is not None:
            callback(i, t1, x)
        if return_trajectory:
            trajectory.append((t1, x))
    return (x, trajectory) if return_trajectory else x


# ------------------------------------------------------------------------------------------------------------------
# Adaptive Dormand-Prince 5(4) (tableau and step-size control of torchdiffeq ``dopri5``)
# ------------------------------------------------------------------------------------------------------------------
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights (FSAL)
)
_DP_E = (  # 5th-order minus 4th-order weights, over the 7 stages
    35 / 384 - 1951 / 21600,
    0.0,
    500 / 1113 - 22642 / 50085,
    125 / 192 - 451 / 720,
    -2187 / 6784 - -12231 / 42400,
    11 / 84 - 649 / 6300,
    -1 / 60,
)


def _host(a) -> np.ndarray:
    """A float64 NumPy copy of an array or tensor (for the error norm only)."""
    if hasattr(a, "asnumpy"):
        a = a.asnumpy()
    elif hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def _combine(x, dt: float, weights, ks):
    """``x + dt * sum_j w_j k_j``, skipping zero weights."""
    acc = None
    for w, k in zip(weights, ks):
        if w != 0.0:
            acc = k * w if acc is None else acc + k * w
    return x + dt * acc


def _initial_step(velocity, x, f0, t0: float, order: int, atol: float, rtol: float) -> float:
    """Hairer, Norsett & Wanner, Solving ODEs I, II.4 (torchdiffeq ``_select_initial_step``); 1 evaluation."""
    xh, fh = _host(x), _host(f0)
    scale = atol + np.abs(xh) * rtol
    d0, d1 = _rms(xh / scale), _rms(fh / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = velocity(x + h0 * f0, t0 + h0)
    d2 = _rms((_host(f1) - fh) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def dopri5(
    velocity,
    x,
    t0: float = 0.0,
    t1: float = 1.0,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_steps: int = 10_000,
    callback=None,
    return_trajectory=False,
):
    """Adaptive Dormand-Prince 5(4) from ``t0`` to ``t1`` (torchdiffeq ``dopri5``; defaults as LT full transport).

    Error ratio ``rms(err / (atol + rtol max(|x|, |x_new|)))``, accept if <= 1, next step
    ``dt * clip(0.9 ratio^(-1/5), 0.2, 10)`` (no shrink after an accepted step), first step by Hairer's rule. Unlike
    torchdiffeq the last step is shortened to land on ``t1`` (no dense-output interpolation). ``callback(i, t, x)``
    after each accepted step. Returns x at ``t1`` (and ``[(t, x), ...]`` at the accepted steps if asked).
    """
    if not (atol > 0 and rtol > 0):
        raise ValueError(f"atol and rtol must be positive, got atol={atol}, rtol={rtol}")
    t, t1 = float(t0), float(t1)
    if not t < t1:
        raise ValueError(f"dopri5 integrates forward in time, got t0={t} >= t1={t1}")
    f = velocity(x, t)
    dt = _initial_step(velocity, x, f, t, 4, atol, rtol)
    trajectory, accepted, attempts = [(t, x)], 0, 0
    while t < t1:
        if attempts == max_steps:
            raise RuntimeError(f"dopri5 did not reach t={t1} in {max_steps} steps (stopped at t={t})")
        attempts += 1
        last = dt >= t1 - t
        dt = t1 - t if last else dt
        ks = [f]
        for c, row in zip(_DP_C, _DP_A):
            ks.append(velocity(_combine(x, dt, row, ks), t + dt if c == 1.0 else t + c * dt))
        x_new = _combine(x, dt, _DP_A[-1], ks)  # the last stage was evaluated at x_new, so f(x_new) = ks[-1] (FSAL)
        err = dt * sum(w * _host(k) for w, k in zip(_DP_E, ks) if w != 0.0)
        ratio = _rms(err / (atol + rtol * np.maximum(np.abs(_host(x)), np.abs(_host(x_new)))))
        if ratio <= 1.0:
            t = t1 if last else t + dt
            x, f = x_new, ks[-1]
            if callback is not None:
                callback(accepted, t, x)
            accepted += 1
            if return_trajectory:
                trajectory.append((t, x))
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.9 * ratio ** (-1 / 5), 1.0 if ratio < 1.0 else 0.2))
        dt *= factor
    return (x, trajectory) if return_trajectory else x


def sample(velocity, x0, grid, solver: str = "midpoint", callback=None, return_trajectory=False, **dopri5_kwargs):
    """Integrate ``dx/dt = velocity(x, t)`` from ``x0`` at ``grid[0]`` to ``grid[-1]`` with the named solver.

    Fixed-step solvers step on the grid points; ``dopri5`` uses only the endpoints and takes ``atol``, ``rtol``,
    ``max_steps``. ``callback(i, t, x)`` runs after every step (a progress bar); see ``solver_steps`` for the count.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    times = _check_grid(grid)
    if solver == "dopri5":
        return dopri5(velocity, x0, times[0], times[-1], callback=callback, return_trajectory=return_trajectory,
                      **dopri5_kwargs)  # fmt: skip
    if dopri5_kwargs:
        raise ValueError(f"{sorted(dopri5_kwargs)} only apply to dopri5, not {solver!r}")
    return _fixed_grid(_STEPS[solver], velocity, x0, times, callback, return_trajectory)


def solver_steps(grid, solver: str):
    """Number of callback calls ``sample`` will make (``None`` for the adaptive dopri5)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    return None if solver == "dopri5" else len(_check_grid(grid)) - 1


# ------------------------------------------------------------------------------------------------------------------
# img2img (LT ``lumina_next_t2i_mini/sample_img2img.py`` with ``transport.ODE(strength=...)``)
# ------------------------------------------------------------------------------------------------------------------
def truncate_grid(grid, strength: float) -> np.ndarray:
    """``grid[int(N (1 - strength)):]`` of the N-point grid (after the shift), as ``ODE(strength=...)``.

    strength 1 keeps the whole grid (start from noise); smaller values start later, nearer the input image.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    g = np.asarray(grid, dtype=np.float64)
    out = g if strength == 1.0 else g[int(len(g) * (1 - strength)) :]
    if len(out) < 2:
        raise ValueError(f"strength {strength} leaves {len(out)} of {len(g)} grid points; raise strength or steps")
    return out


def img2img_start(noise, x1, t0: float):
    """The img2img start latent ``(1 - t0) noise + t0 x1`` (x1 the encoded, scaled input image), on the path x_t."""
    return noise * (1.0 - t0) + x1 * t0


# ------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance (LT ``model.py`` ``forward_with_cfg``)
# ------------------------------------------------------------------------------------------------------------------
def _concat(parts, axis: int = 0):
    """Concatenate NumPy arrays, torch tensors or MindSpore Tensors."""
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, axis=axis)
    if type(first).__module__.startswith("torch"):
        import torch

        return torch.cat(parts, dim=axis)
    from mindspore import mint

    return mint.cat(parts, dim=axis)


def combine_guidance(out, guidance_scale: float, guided_channels: int | None = 3):
    """``u + w (c - u)`` on a [cond, uncond] batch (2B, C, ...) -> (B, C, ...), on the first ``guided_channels``.

    The original guides latent channels 0-2 only and keeps the conditional value on channel 3 (DiT's "exact
    reproducibility" trick); ``guided_channels=None`` guides all channels.
    """
    half = out.shape[0] // 2
    cond, uncond = out[:half], out[half:]  # (B, C, H, W) each
    guided = uncond + guidance_scale * (cond - uncond)
    if guided_channels is None or guided_channels >= out.shape[1]:
        return guided
    return _concat([guided[:, :guided_channels], cond[:, guided_channels:]], axis=1)


def forward_with_cfg(model_fn, x, guidance_scale: float, guided_channels: int | None = 3):
    """The original ``forward_with_cfg`` calling convention: the first half of ``x`` (2B, C, H, W) is run as
    ``model_fn(cat[half, half])`` with captions [cond, uncond], and the full batch is returned as the original does:
    the guided channels repeated for both halves, the unguided ones (channel 3 by default) as each half computed them.
    """
    half = x[: x.shape[0] // 2]
    out = model_fn(_concat([half, half], axis=0))  # (2B, C, H, W)
    guided = combine_guidance(out, guidance_scale, None)  # (B, C, H, W)
    k = out.shape[1] if guided_channels is None else guided_channels
    return _concat([_concat([guided[:, :k], guided[:, :k]], axis=0), out[:, k:]], axis=1)


def cfg_velocity(model_fn, guidance_scale: float, guided_channels: int | None = 3):
    """Wrap ``model_fn(x2, t) -> v2`` over a [cond, uncond] caption batch into a guided ``velocity(x, t)``.

    ``x`` (B, C, H, W) is duplicated to (2B, C, H, W) as the original feeds ``[x, x]``; ``model_fn`` receives the
    evaluation time ``t`` (a float), which is what the time-aware RoPE switch reads (original: ``t[0]``).
    """
    if not guidance_scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
    if guided_channels is not None and guided_channels < 1:
        raise ValueError(f"guided_channels must be >= 1 or None (all), got {guided_channels}")

    def velocity(x, t: float):
        out = model_fn(_concat([x, x], axis=0), t)  # (2B, C, H, W): rows [cond, uncond]
        return combine_guidance(out, guidance_scale, guided_channels)

    return velocity


# ------------------------------------------------------------------------------------------------------------------
# Resolution extrapolation: time-aware scaled RoPE and proportional attention settings
# ------------------------------------------------------------------------------------------------------------------
def resolution_scale_factor(height_px: int, width_px: int, train_area: int = TRAIN_SIZE**2, mode: str = "original"):
    """RoPE scale factor ``s = sqrt(W H / train_area)``.

    ``"original"`` (LT mini ``sample.py``/``demo.py``): s only beyond the training area, else 1. sample.py switches on
    ``res_cat > 1024`` and the demo on its "(Extrapolation)" labels; for every resolution they offer this is exactly
    ``W H > 1024^2`` (1024x1024, 512x2048 -> 1; 1536^2 -> 1.5; 2048x1024 -> sqrt 2). ``"always"`` (diffusers
    ``LuminaPipeline``): s at every size, also < 1 below the training area.
    """
    if height_px < 1 or width_px < 1 or train_area < 1:
        raise ValueError(f"height, width and train_area must be positive, got {height_px}, {width_px}, {train_area}")
    if mode not in ("original", "always"):
        raise ValueError(f"unknown scaling mode {mode!r}; valid: original, always")
    area = height_px * width_px
    if mode == "original" and area <= train_area:
        return 1.0
    return math.sqrt(area / train_area)


def rope_scaling(
    height_px: int,
    width_px: int,
    watershed: float = 0.3,
    proportional_attn: bool = True,
    mode: str = "original",
    smooth: bool = False,
    train_size: int = TRAIN_SIZE,
) -> dict:
    """Keyword arguments of ``nextdit.RopeScaling`` as the original sampler sets them for an image size.

    With scaling on: ``scale_factor = s``, ``scale_watershed = watershed`` (demo 0.3; PI while t < watershed, NTK
    after, decided per model evaluation). Off (s = 1): watershed 1 as the original. ``base_seqlen`` =
    ``(train_size // 16)^2`` = 4096 with proportional attention, else None.
    """
    if not 0.0 <= watershed <= 1.0:
        raise ValueError(f"watershed must be in [0, 1], got {watershed}")
    s = resolution_scale_factor(height_px, width_px, train_size**2, mode)
    return {
        "scale_factor": s,
        "scale_watershed": watershed if (s != 1.0 or mode == "always") else 1.0,
        "smooth": smooth,
        "base_seqlen": (train_size // 16) ** 2 if proportional_attn else None,
    }
