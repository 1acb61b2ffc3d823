"""Gemma-2B prompt encoding on CPU: MindSpore (this port, graph mode) against transformers (torch), same run.

    python benchmarks/bench_gemma.py [--batch 2] [--tokens 128] [--iters 3] [--dtype fp32]

The ``gemma-2b`` preset with random weights (about 10 GB in fp32) encodes a (batch x tokens) batch whose second row
is padded to 3/4 of the length. Each framework runs in its own subprocess, one after the other, so that peak memory
(``ru_maxrss``) is per framework and the two models are never resident together. Latency is the median of ``--iters``
timed calls after one warm-up call (the warm-up includes graph compilation for MindSpore, reported separately).
transformers runs the whole ``GemmaModel`` with ``output_hidden_states=True`` as the reference pipeline does; the port
stops after layer 17 of 18 (``hidden_states[-2]`` needs nothing later), which is part of what is measured.
"""

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def inputs(batch: int, tokens: int):
    rng = np.random.RandomState(0)
    ids = rng.randint(4, 256000, (batch, tokens))
    ids[:, 0] = 2  # BOS
    mask = np.ones_like(ids)
    mask[1:, tokens * 3 // 4 :] = 0  # a padded row, as in a [cond, uncond] batch
    ids[mask == 0] = 0
    return ids, mask


def timed(fn, iters: int):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def run_torch(args) -> dict:
    import torch
    from transformers import GemmaConfig, GemmaModel

    from mindone_lumina.text.gemma import PRESETS

    cfg = PRESETS["gemma-2b"]
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    hf_cfg = GemmaConfig(**dataclasses.asdict(cfg), hidden_act="gelu_pytorch_tanh")
    model = GemmaModel(hf_cfg).to(dtype).eval()
    ids, mask = inputs(args.batch, args.tokens)
    ids, mask = torch.tensor(ids), torch.tensor(mask)

    def call():
        with torch.no_grad():
            return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    first, median, times = timed(call, args.iters)
    return dict(framework=f"torch {torch.__version__} (transformers)", threads=torch.get_num_threads(), first=first,
                median=median, times=times)  # fmt: skip


def run_mindspore(args) -> dict:
    import mindspore as ms

    from mindone_lumina.dtypes import ms_dtype
    from mindone_lumina.models.layers import cast_parameters
    from mindone_lumina.text.decoder import DecoderEncoder
    from mindone_lumina.text.gemma import PRESETS

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    encoder = DecoderEncoder(PRESETS["gemma-2b"])  # projections: xavier-uniform random
    table = encoder.embed_tokens.weight
    table.set_data(ms.Tensor(np.random.default_rng(0).standard_normal(table.shape, dtype=np.float32) * 0.02))
    cast_parameters(encoder, ms_dtype(args.dtype))
    ids, mask = inputs(args.batch, args.tokens)
    ids, mask = ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32))

    def call():
        return encoder(ids, mask).asnumpy()  # asnumpy waits for the result

    first, median, times = timed(call, args.iters)
    return dict(framework=f"mindspore {ms.__version__} graph mode", first=first, median=median, times=times)


def worker(args) -> None:
    result = run_torch(args) if args.worker == "torch" else run_mindspore(args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--iters", type=int, default=3, help="timed calls after the warm-up (median reported)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--worker", choices=("torch", "mindspore"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    results = {}
    for fw in ("torch", "mindspore"):
        cmd = [sys.executable, __file__, "--worker", fw, "--batch", str(args.batch), "--tokens", str(args.tokens),
               "--iters", str(args.iters), "--dtype", args.dtype]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{fw} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[fw] = json.loads(lines[-1][len("RESULT ") :])

    print(f"gemma-2b prompt encoding, batch {args.batch} x {args.tokens} tokens, {args.dtype}, CPU "
          f"({platform.processor() or platform.machine()}), median of {args.iters} after 1 warm-up")  # fmt: skip
    for r in results.values():
        times = ", ".join(f"{t:.2f}" for t in r["times"])
        print(f"  {r['framework']:<40} median {r['median']:.2f} s  [{times}]  first call {r['first']:.2f} s  "
              f"peak RSS {r['peak_rss_gb']:.1f} GiB")  # fmt: skip
    ratio = results["mindspore"]["median"] / results["torch"]["median"]
    print(f"  latency ratio mindspore / torch: {ratio:.2f}")


if __name__ == "__main__":
    main()
