"""The one table of numerical budgets, read by the tests, the parity report (``parity.py``) and the self-check
(``selfcheck.py``).

Each budget is the relative Frobenius error ``||ms - ref|| / ||ref||`` allowed between a MindSpore component run in a
dtype and the PyTorch reference run in fp32 on the same weights and inputs. fp32: the port must agree to rounding
(1e-5; 1e-4 for a whole sampling trajectory, whose steps compound it; 2e-5 for a training step's gradients, which
sum over the batch and the tied query's two uses). fp16: 1.6-3x the worst error measured on the tiny test models
(2026-11-22, graph and PyNative): Next-DiT 1.68e-3, Gemma 4.31e-3, VAE 2.6e-3 / 3.13e-3, sampling steps 1.66e-3;
and on the golden bundle's models (2026-12-05, graph mode, head_dim 72): Next-DiT 2.42e-3, VAE 4.54e-3, sampling
steps 5.52e-3, training-step gradients 4.05e-3 (fp16 compute over fp32 weights, as the recipes train). bf16 (8
mantissa bits to fp16's 11) computes on Ascend only; here only the reference's own bf16 run could be measured
(diffusers' Next-DiT in bf16 against the fp32 port: 9.8e-3), so its budgets are 3x fp16's.
"""

BUDGETS = {
    "fp32": {"transformer": 1e-5, "text_encoder": 1e-5, "vae": 1e-5, "sampling": 1e-4, "training": 2e-5},
    "fp16": {"transformer": 5e-3, "text_encoder": 1e-2, "vae": 1e-2, "sampling": 1.5e-2, "training": 1e-2},
}
BUDGETS["bf16"] = {k: 3 * v for k, v in BUDGETS["fp16"].items()}


def budget(dtype: str, component: str) -> float:
    return BUDGETS[dtype][component]
