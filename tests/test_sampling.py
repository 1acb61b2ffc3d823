"""Sampler tests: time convention, solver orders, grids, img2img, guidance, RoPE scaling settings, bad input.

All NumPy (float64 unless stated) and fast; euler, midpoint, rk4 and dopri5 are cross-checked against
``torchdiffeq.odeint`` (the integrator the original sampler calls) in float32 and float64.
"""

import math

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

import mindspore as ms

from mindone_lumina import sampling

RNG = np.random.default_rng(0)


def exp_field(a):
    return lambda x, t: a * x  # dx/dt = a x, exact x(1) = x(0) e^(a (1 - t0))


# ------------------------------------------------------------------------------------------------------------------
# Time convention and solver orders
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_constant_velocity_lands_on_data(solver):
    """x_t = t x1 + (1 - t) x0 with v = x1 - x0: every solver is exact on the shifted grid (<= 1e-12)."""
    x0, x1 = RNG.standard_normal((2, 4, 3, 3)), RNG.standard_normal((2, 4, 3, 3))
    grid = sampling.time_grid(12, "shift", 4.0)
    x, traj = sampling.sample(lambda x, t: x1 - x0, x0, grid, solver, return_trajectory=True)
    assert np.abs(x - x1).max() <= 1e-12
    for t, xt in traj:  # the whole path, t = 0 noise ... t = 1 data
        assert np.abs(xt - (t * x1 + (1 - t) * x0)).max() <= 1e-12
    assert [t for t, _ in traj] == list(grid)


@pytest.mark.parametrize("solver, order, nfe", [("euler", 1, 1), ("midpoint", 2, 2), ("rk4", 4, 4)])
def test_order_of_convergence(solver, order, nfe):
    """Halving the step on dx/dt = x divides the error at t = 1 by 2^order (log2 ratio within 0.1)."""
    calls = []

    def velocity(x, t):
        calls.append(t)
        return x

    errors = []
    for n in (16, 32):
        calls.clear()
        x = sampling.sample(velocity, 1.0, sampling.time_grid(n + 1, "uniform"), solver)
        errors.append(abs(x - math.e))
        assert len(calls) == nfe * n
    assert abs(math.log2(errors[0] / errors[1]) - order) <= 0.1


def test_rk4_is_the_three_eighths_rule():
    """One step of dx/dt = x^2 from x = 1 over dt = 1, worked by hand with the 3/8 rule:
    k1 = 1, k2 = (4/3)^2 = 16/9, k3 = (1 + 16/9 - 1/3)^2 = 484/81, k4 = (1 + 1 - 16/9 + 484/81)^2 = 252004/6561,
    x1 = 1 + (k1 + 3 (k2 + k3) + k4) / 8 = 463657/52488. Classical RK4 gives 8.4922..., so the rules differ here."""
    x1 = sampling.rk4_step(lambda x, t: x * x, 1.0, 0.0, 1.0)
    assert abs(x1 - 463657 / 52488) <= 1e-12
    assert abs(x1 - 8.49222) > 0.3


def test_dopri5_tolerances():
    """dopri5 on dx/dt = x over [0, 1]: error <= 1e-6 at atol 1e-9 / rtol 1e-7; <= 1e-3 at the defaults."""
    seen = []
    x, traj = sampling.dopri5(exp_field(1.0), 1.0, atol=1e-9, rtol=1e-7, callback=lambda i, t, x: seen.append((i, t)),
                              return_trajectory=True)  # fmt: skip
    assert abs(x - math.e) <= 1e-6
    assert traj[-1][0] == 1.0 and [i for i, _ in seen] == list(range(len(seen)))
    assert all(b > a for (_, a), (_, b) in zip(seen, seen[1:]))
    x = sampling.sample(exp_field(1.0), np.ones(3), sampling.time_grid(5), "dopri5")  # default atol 1e-6, rtol 1e-3
    assert np.abs(x - math.e).max() <= 1e-3


def test_dopri5_non_autonomous_from_t0():
    """dx/dt = cos(t) x from t0 = 0.4: x(1) = x(t0) exp(sin 1 - sin 0.4) within 1e-6 (atol 1e-10, rtol 1e-8)."""
    x = sampling.dopri5(lambda x, t: math.cos(t) * x, 2.0, t0=0.4, atol=1e-10, rtol=1e-8)
    assert abs(x - 2.0 * math.exp(math.sin(1.0) - math.sin(0.4))) <= 1e-6


def test_progress_callback_and_step_count():
    """The demo setting (30 grid points, midpoint): 29 callbacks, 58 model evaluations."""
    grid, calls, steps = sampling.time_grid(30), [], []
    sampling.sample(lambda x, t: calls.append(t) or -x, np.zeros(2), grid, "midpoint",
                    callback=lambda i, t, x: steps.append((i, t)))  # fmt: skip
    assert sampling.solver_steps(grid, "midpoint") == len(steps) == 29 and len(calls) == 58
    assert steps[-1] == (28, 1.0) and sampling.solver_steps(grid, "dopri5") is None
    # the velocity (and so the time-aware RoPE switch) sees the evaluation times t0 and t0 + dt/2
    assert calls[:4] == [grid[0], 0.5 * grid[1], grid[1], grid[1] + 0.5 * (grid[2] - grid[1])]


# ------------------------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------------------------
def test_shift_grid_formula_and_endpoints():
    """t' = t / (t + s - s t) on linspace(0, 1, N) (<= 1e-15); exact 0 and 1; increasing; s = 1 is uniform."""
    u = np.linspace(0, 1, 30)
    grid = sampling.time_grid(30, "shift", 4.0)
    assert grid.shape == (30,) and grid[0] == 0.0 and grid[-1] == 1.0
    assert np.abs(grid - u / (u + 4 - 4 * u)).max() <= 1e-15
    assert np.all(np.diff(grid) > 0)
    assert np.abs(sampling.time_grid(30, "shift", 1.0) - u).max() <= 1e-15
    assert np.array_equal(sampling.time_grid(30, "uniform"), u)
    # spec section 3: with shift 4 and 30 grid points, 19 grid times are below the 0.3 watershed
    assert int((grid < 0.3).sum()) == 19


def test_shift_grid_matches_original_float32():
    """Against the original ``torch.linspace(0, 1, N)`` + shift in float32: <= 2e-7 (2 float32 ulps at 1)."""
    torch = pytest.importorskip("torch")
    t = torch.linspace(0, 1, 30)
    t = t / (t + 4.0 - 4.0 * t)
    assert np.abs(sampling.time_grid(30, "shift", 4.0) - t.numpy().astype(np.float64)).max() <= 2e-7


def test_sigmoid_grid():
    """Exact endpoints, increasing, symmetric (t_i + t_{N-1-i} = 1 within 1e-15), end steps < 1/(N-1) < middle step."""
    n = 11
    grid = sampling.time_grid(n, "sigmoid", steepness=6.0)
    steps = np.diff(grid)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(steps > 0)
    assert np.abs(grid + grid[::-1] - 1.0).max() <= 1e-15
    uniform = 1.0 / (n - 1)
    assert steps[0] < 0.5 * uniform and steps[-1] < 0.5 * uniform and steps[n // 2] > 1.2 * uniform
    # steeper = denser at the ends; tiny steepness tends to uniform
    assert np.diff(sampling.time_grid(n, "sigmoid", steepness=10.0))[0] < steps[0]
    assert np.abs(sampling.time_grid(n, "sigmoid", steepness=1e-4) - np.linspace(0, 1, n)).max() <= 1e-8


# ------------------------------------------------------------------------------------------------------------------
# img2img
# ------------------------------------------------------------------------------------------------------------------
def test_img2img_grid_and_start():
    """30 points, shift 4, strength 0.6: grid[12:] as ``ODE(strength=0.6)`` (int(30 * 0.4) = 12), start on x_t0."""
    grid = sampling.time_grid(30, "shift", 4.0)
    sub = sampling.truncate_grid(grid, 0.6)
    assert len(sub) == 18 and np.array_equal(sub, grid[12:])
    t0 = sub[0]
    assert abs(t0 - (12 / 29) / (12 / 29 + 4 - 4 * 12 / 29)) <= 1e-15
    noise, x1 = RNG.standard_normal((1, 4, 2, 2)), RNG.standard_normal((1, 4, 2, 2))
    z = sampling.img2img_start(noise, x1, t0)
    assert np.abs(z - ((1 - t0) * noise + t0 * x1)).max() <= 1e-15
    assert np.array_equal(sampling.truncate_grid(grid, 1.0), grid)
    # with v = x1 - noise the truncated run still lands on x1
    x = sampling.sample(lambda x, t: x1 - noise, z, sub, "midpoint")
    assert np.abs(x - x1).max() <= 1e-12


def test_img2img_grid_matches_original_indexing():
    """The original's float arithmetic ``int(num_steps * (1 - strength))`` for a few strengths."""
    for n, strength in [(30, 0.6), (20, 0.3), (50, 0.75), (10, 0.9)]:
        sub = sampling.truncate_grid(sampling.time_grid(n), strength)
        assert len(sub) == n - int(n * (1 - strength))


# ------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------------------------------
def test_guidance_channels():
    """Channels 0-2 get u + w (c - u), channel 3 keeps c; ``None`` guides all 4 (<= 1e-15)."""
    out = RNG.standard_normal((4, 4, 2, 2))  # [cond (2), uncond (2)]
    cond, uncond = out[:2], out[2:]
    full = uncond + 4.0 * (cond - uncond)
    g = sampling.combine_guidance(out, 4.0)
    assert g.shape == (2, 4, 2, 2)
    assert np.abs(g[:, :3] - full[:, :3]).max() <= 1e-15 and np.array_equal(g[:, 3:], cond[:, 3:])
    assert np.abs(sampling.combine_guidance(out, 4.0, None) - full).max() <= 1e-15


def test_guidance_on_mindspore_tensors(pynative):
    """The combine on MindSpore Tensors equals the NumPy one (<= 1e-6, fp32)."""
    arr = RNG.standard_normal((4, 4, 2, 2)).astype(np.float32)
    for channels in (3, None):
        ours = sampling.combine_guidance(ms.Tensor(arr), 4.0, channels).asnumpy()
        assert np.abs(ours - sampling.combine_guidance(arr, 4.0, channels)).max() <= 1e-6
    # the CFG velocity wrapper on MindSpore Tensors: [x, x] in, guided half out
    x = ms.Tensor(RNG.standard_normal((2, 4, 2, 2)).astype(np.float32))
    rows = ms.Tensor(np.array([2, 2, 1, 1], np.float32)[:, None, None, None])  # cond = 2x, uncond = x
    v = sampling.cfg_velocity(lambda x2, t: x2 * rows, 3.0)
    ref = x.asnumpy() * 4.0  # u + 3 (c - u) with c = 2x, u = x on channels 0-2
    ref[:, 3:] = 2.0 * x.asnumpy()[:, 3:]
    assert np.abs(v(x, 0.5).asnumpy() - ref).max() <= 1e-6


def test_cfg_velocity_batch():
    """The model sees [x, x] and the evaluation time; the result is the guided (B, C, H, W) velocity."""
    x = RNG.standard_normal((2, 4, 2, 2))
    seen = {}

    def model_fn(x2, t):
        seen["x2"], seen["t"] = x2, t
        return np.concatenate([x2[:2] * 2.0, x2[2:] * 1.0])  # cond = 2x, uncond = x

    v = sampling.cfg_velocity(model_fn, 3.0)(x, 0.25)
    assert np.array_equal(seen["x2"], np.concatenate([x, x])) and seen["t"] == 0.25
    assert np.abs(v[:, :3] - (x + 3.0 * x)[:, :3]).max() <= 1e-15 and np.array_equal(v[:, 3:], 2.0 * x[:, 3:])


# ------------------------------------------------------------------------------------------------------------------
# Cross-checks: torchdiffeq, and the MindSpore Tensor path
# ------------------------------------------------------------------------------------------------------------------
def _field_np(w, b):
    t_type = np.float32 if w.dtype == np.float32 else float
    return lambda x, t: np.tanh(x @ w + b * t_type(t)) * t_type(1.0 + t)


def _field_torch(w, b):
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    return lambda t, y: torch.tanh(y @ tw + tb * t) * (1 + t)  # torchdiffeq's func(t, y)


def test_fixed_grid_solvers_match_torchdiffeq():
    """``torchdiffeq.odeint(..., method=...)`` (euler, midpoint, rk4) steps exactly on the given times: on the
    original's grid (``linspace(0, 1, 20)``, shift 4, in the state's dtype) and a random nonlinear field, the whole
    trajectory agrees within 1e-6 in fp32 (measured <= 2.4e-7) and 1e-12 in fp64, and so does the end point on our
    own float64 grid (<= 4.8e-7). The RNG draws are the ones the hand-typed midpoint check it replaces made, so the
    tests after it see the same data."""
    w = (RNG.standard_normal((8, 8)) / 3).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    x0 = RNG.standard_normal((3, 8)).astype(np.float32)
    for dtype, torch_dtype, tol in ((np.float32, torch.float32, 1e-6), (np.float64, torch.float64, 1e-12)):
        wd, bd, x0d = w.astype(dtype), b.astype(dtype), x0.astype(dtype)
        t = torch.linspace(0, 1, 20, dtype=torch_dtype)
        t = t / (t + 4.0 - 4.0 * t)
        field = _field_np(wd, bd)
        for solver in ("euler", "midpoint", "rk4"):
            ref = odeint(_field_torch(wd, bd), torch.from_numpy(x0d), t, method=solver).numpy()
            ours, traj = sampling.sample(field, x0d, t.numpy().astype(np.float64), solver, return_trajectory=True)
            assert ours.dtype == dtype
            assert np.abs(np.stack([x for _, x in traj]) - ref).max() <= tol, (solver, dtype)
            ours = sampling.sample(field, x0d, sampling.time_grid(20, "shift", 4.0), solver)
            assert ours.dtype == dtype
            assert np.abs(ours - ref[-1]).max() <= tol, (solver, dtype)


def test_torchdiffeq_rk4_is_the_three_eighths_rule():
    """torchdiffeq's "rk4" (``rk4_alt_step_func``) gives the hand-worked 3/8-rule step of test_rk4_is_the_three_
    eighths_rule, as ``sampling.rk4_step`` does."""
    y = odeint(lambda t, y: y * y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
               method="rk4")  # fmt: skip
    assert abs(y[-1].item() - 463657 / 52488) <= 1e-12


_KNOWN = {  # dx/dt = f(x, t) from t0 to 1 with its exact x(1)
    "cos(t) x": (lambda x, t: math.cos(t) * x, lambda t, y: torch.cos(t) * y, [2.0, -1.0, 0.5], 0.4,
                 lambda x0: x0 * math.exp(math.sin(1.0) - math.sin(0.4))),
    "x^2": (lambda x, t: x * x, lambda t, y: y * y, [0.5, -1.0, 0.2], 0.0, lambda x0: x0 / (1.0 - x0)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_KNOWN))
@pytest.mark.parametrize("atol, rtol, tol", [(1e-10, 1e-8, 1e-6), (1e-6, 1e-3, 1e-2)], ids=["tight", "defaults"])
def test_dopri5_matches_torchdiffeq(name, atol, rtol, tol):
    """Against ``odeint(..., method="dopri5")`` with the same tolerances on fields with a known solution: at atol 1e-10
    / rtol 1e-8 both within 1e-6 of the exact x(1) and of each other, with model evaluations within 15 % (measured
    56 vs 56 and 86 vs 92); at the defaults (1e-6 / 1e-3) both within 1e-2 (measured <= 5.5e-3). torchdiffeq
    interpolates to t = 1, we shorten the last step."""
    f_np, f_torch, x0, t0, exact = _KNOWN[name]
    x0 = np.array(x0)
    ours_t, ref_t = [], []  # evaluation times, one per model evaluation
    times = torch.tensor([t0, 1.0], dtype=torch.float64)
    ref = odeint(lambda t, y: ref_t.append(t) or f_torch(t, y), torch.from_numpy(x0), times, method="dopri5",
                 rtol=rtol, atol=atol)[-1].numpy()  # fmt: skip
    ours = sampling.sample(lambda x, t: ours_t.append(t) or f_np(x, t), x0, [t0, 1.0], "dopri5", atol=atol, rtol=rtol)
    assert np.abs(ours - exact(x0)).max() <= tol and np.abs(ref - exact(x0)).max() <= tol
    assert np.abs(ours - ref).max() <= tol
    if atol == 1e-10:
        assert abs(len(ours_t) - len(ref_t)) <= 0.15 * len(ref_t), (len(ours_t), len(ref_t))


def test_mindspore_tensor_state(pynative):
    """The same solver code on MindSpore Tensors (rk4 and dopri5) agrees with NumPy fp32 within 1e-5."""
    from mindspore import mint

    w = (RNG.standard_normal((8, 8)) / 3).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    x0 = RNG.standard_normal((3, 8)).astype(np.float32)
    mw, mb = ms.Tensor(w), ms.Tensor(b)

    def field_ms(x, t):
        return mint.tanh(mint.matmul(x, mw) + mb * t) * (1.0 + t)

    grid = sampling.time_grid(10)
    for solver in ("rk4", "dopri5"):
        ref = sampling.sample(_field_np(w, b), x0, grid, solver)
        out = sampling.sample(field_ms, ms.Tensor(x0), grid, solver)
        assert isinstance(out, ms.Tensor) and np.abs(out.asnumpy() - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------------------------------
# Resolution extrapolation settings
# ------------------------------------------------------------------------------------------------------------------
def test_resolution_scale_factor():
    """The demo's resolutions (spec section 3): 1 in distribution, sqrt(WH)/1024 beyond (<= 1e-15)."""
    expected = {(1024, 1024): 1.0, (512, 2048): 1.0, (2048, 512): 1.0, (1536, 1536): 1.5, (2048, 1024): math.sqrt(2),
                (1024, 2048): math.sqrt(2), (2048, 2048): 2.0, (4096, 1024): 2.0, (1024, 4096): 2.0}  # fmt: skip
    for (w, h), s in expected.items():
        assert abs(sampling.resolution_scale_factor(h, w) - s) <= 1e-15
    assert sampling.resolution_scale_factor(512, 512, mode="always") == 0.5  # diffusers computes it at every size
    assert sampling.resolution_scale_factor(512, 512) == 1.0


def test_rope_scaling_settings():
    """As the original sets ``forward_with_cfg`` kwargs: on beyond 1024^2 (watershed 0.3), off = (1, 1); base 4096."""
    on = sampling.rope_scaling(2048, 2048)
    assert on == {"scale_factor": 2.0, "scale_watershed": 0.3, "smooth": False, "base_seqlen": 4096}
    off = sampling.rope_scaling(1024, 1024, proportional_attn=False)
    assert off == {"scale_factor": 1.0, "scale_watershed": 1.0, "smooth": False, "base_seqlen": None}


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sampling.time_grid(1), "num_steps"),
        (lambda: sampling.time_grid(0), "num_steps"),
        (lambda: sampling.time_grid(2.5), "num_steps"),
        (lambda: sampling.time_grid(10, "cosine"), "shift, uniform, sigmoid"),
        (lambda: sampling.time_grid(10, shift=0.0), "shift"),
        (lambda: sampling.time_grid(10, shift=-2.0), "shift"),
        (lambda: sampling.time_grid(10, "sigmoid", steepness=0.0), "steepness"),
        (lambda: sampling.sample(None, 0.0, [0.0, 1.0], "heun"), "euler, midpoint, rk4, dopri5"),
        (lambda: sampling.sample(None, 0.0, [0.0, 0.5, 0.5, 1.0], "euler"), "increasing"),
        (lambda: sampling.sample(None, 0.0, [0.0], "euler"), "at least 2"),
        (lambda: sampling.sample(None, 0.0, [0.0, 1.0], "euler", atol=1e-3), "dopri5"),
        (lambda: sampling.dopri5(None, 0.0, atol=0.0), "atol"),
        (lambda: sampling.truncate_grid(np.linspace(0, 1, 10), 0.0), "strength"),
        (lambda: sampling.truncate_grid(np.linspace(0, 1, 10), 1.5), "strength"),
        (lambda: sampling.truncate_grid(np.linspace(0, 1, 10), 0.05), "raise strength"),
        (lambda: sampling.cfg_velocity(None, -1.0), "guidance"),
        (lambda: sampling.resolution_scale_factor(0, 1024), "positive"),
        (lambda: sampling.resolution_scale_factor(1024, 1024, mode="auto"), "original, always"),
        (lambda: sampling.rope_scaling(1024, 1024, watershed=1.5), "watershed"),
    ],
)
def test_bad_input(call, match):
    """Each raises ValueError before any model evaluation (velocity is None)."""
    with pytest.raises(ValueError, match=match):
        call()
