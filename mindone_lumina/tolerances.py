"""The one table of numerical budgets, read by the tests and by the parity report (``parity.py``).

Each budget is the relative Frobenius error ``||ms - ref|| / ||ref||`` allowed between a MindSpore component run in a
dtype and the PyTorch reference run in fp32 on the same weights and inputs. fp32: the port must agree to rounding
(1e-5; 1e-4 for a whole sampling trajectory, whose steps compound it). fp16: 1.6-3x the worst error measured on
the tiny test models (2026-11-22, graph and PyNative): Next-DiT 1.68e-3, Gemma 4.31e-3, VAE 2.6e-3 / 3.13e-3,
sampling steps 1.66e-3. bf16 (8 mantissa bits to fp16's 11) computes on Ascend only; here only the reference's own
bf16 run could be measured (diffusers' Next-DiT in bf16 against the fp32 port: 9.8e-3), so its budgets are 3x fp16's.
"""

BUDGETS = {
    "fp32": {"transformer": 1e-5, "text_encoder": 1e-5, "vae": 1e-5, "sampling": 1e-4},
    "fp16": {"transformer": 5e-3, "text_encoder": 1e-2, "vae": 5e-3, "sampling": 5e-3},
}
BUDGETS["bf16"] = {k: 3 * v for k, v in BUDGETS["fp16"].items()}


def budget(dtype: str, component: str) -> float:
    return BUDGETS[dtype][component]
