"""The CPU convolution kernels other than the compiled one (``convolution.conv_kernel``): without the compiled kernels
(``MINDONE_LUMINA_CPU_KERNELS=0``), MindSpore's own Conv2D where oneDNN runs below AVX-512 and one matmul per kernel
tap elsewhere.

oneDNN fixes its instruction set at its first use, so every case runs in a fresh process. The first test shows that
``ONEDNN_MAX_CPU_ISA=AVX2`` (and ``favour_convolutions`` before any op) selects the native kernel; the second reruns
the VAE's parity tests against diffusers, its gradient test and its 24-step training run (past the step where a graph
with ``ops.pad`` used to hang) on the native kernel and on the per-tap matmuls with MindSpore's GroupNorm, so every
CPU path is tested whatever processor and compiler CI has.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(args, **env):
    """A fresh Python process in the repository root; returns its stdout, or fails with its stderr."""
    unset = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MINDONE_LUMINA_CONV")
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ["MINDONE_LUMINA_CPU_KERNELS"] = "0"
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env={**environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


PROBE = """
import mindspore as ms
from mindspore import Tensor, ops
from mindone_lumina import backend, convolution
from mindone_lumina.models.vae import AutoencoderKL, VAEConfig

ms.set_device("CPU")
if {op_first}:
    ops.add(Tensor([1.0]), Tensor([1.0])).asnumpy()
favoured = convolution.favour_convolutions() if {favour} else None
isa = convolution._onednn().dnnl_get_effective_cpu_isa()
kernels = [c.kernel for _, c in AutoencoderKL(VAEConfig(block_out_channels=(8,), norm_num_groups=4)).cells_and_names()
           if hasattr(c, "kernel")]
chosen = convolution.conv_kernel()
print(favoured != "taps" if {favour} else None, chosen == "framework", isa, len(kernels), set(kernels) == {{chosen}})
"""


def probe(op_first: bool, favour: bool, **env):
    favoured, native, isa, convs, agree = run(["-c", PROBE.format(op_first=op_first, favour=favour)], **env).split()
    assert int(convs) > 0 and agree == "True"  # every conv of the VAE asked the backend
    below_avx512 = int(isa) & 0x27 != 0x27  # dnnl_cpu_isa_avx512_core's bits
    assert native == str(below_avx512), (native, isa)
    return favoured, native == "True", below_avx512


def test_instruction_set_decides_the_kernel():
    assert probe(False, False, ONEDNN_MAX_CPU_ISA="AVX2")[1:] == (True, True)  # the user's cap
    assert probe(False, True) == ("True", True, True)  # favour_convolutions before any op caps oneDNN
    favoured, native, _ = probe(True, True)  # too late: oneDNN has run; the answer still matches the kernel it runs
    assert favoured == str(native)


def test_vae_on_the_native_kernel():
    tests = [f"tests/test_vae.py::test_{name}_parity" for name in ("decode", "encode", "fp16")]
    tests += [f"tests/test_vae_training.py::test_{name}" for name in ("loss_and_gradients_match_diffusers",
                                                                      "vae_trains_resumes_and_exports")]  # fmt: skip
    for setting in ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"MINDONE_LUMINA_CONV": "taps"}):
        out = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], **setting)
        assert " passed" in out and "failed" not in out and "skipped" not in out, (setting, out[-2000:])
