"""Try a text-to-image model in the browser: a Gradio page over one pipeline, as the original Lumina-Next demo.

    python tools/web_demo.py                              # the bundled default model on http://127.0.0.1:7860
    python tools/web_demo.py --model DIR --port 8000      # any model folder ``tools/sample.py`` reads

The model is loaded once, before the server starts. The page has the prompt, the negative prompt, a resolution list
(the model's training size and the original demo's extrapolations of it; a typed WIDTHxHEIGHT works too), steps, seed
(0 draws one), solver, time schedule and shift, guidance scale and, under "advanced", the RoPE extrapolation, its
watershed, the smooth RoPE formula, proportional attention and Context Drop (merge factor, time window, layers). Each
image comes with its settings as JSON, the ``tools/sample.py`` command that makes it again, a PNG carrying the
settings in its text metadata (as ``tools/sample.py`` writes them) and a gallery of this visitor's earlier images. A
progress bar advances per solver step; the first image at a size says that the model is being compiled for it.

Requests wait in one queue and ``--concurrency`` (1) of them run at a time, so two visitors never run two graphs at
once. A request the server cannot serve (empty prompt, steps out of range, an image larger than ``--max-pixels``)
gets a message in the page, and the server goes on. The named API endpoint ``/generate`` takes a prompt alone (every
other input has a default), e.g. with ``gradio_client``::

    Client("http://127.0.0.1:7860").predict("a red circle on a blue background", api_name="/generate")

The server listens on 127.0.0.1 (this machine only): ``--host 0.0.0.0`` opens it to the network, without a login.
Ctrl-C or SIGTERM stops it (exit status 130 / 143).
"""

import dataclasses
import logging
import math
import os
import re
import secrets
import shlex
import socket
import sys
import tempfile
import threading
import time

import mindspore as ms

from mindone_lumina import backend, cli, sampling
from mindone_lumina.pipeline import DEFAULT_MODEL, SampleSettings, TextToImagePipeline, size_factors
from mindone_lumina.text.tokenizers import words

# (width, height) the original demo offers a 1024-px model: its training size, then extrapolations to 4x its area;
# other models get these scaled by train_size / 1024
EXTRAPOLATIONS = ((1024, 1024), (1536, 1536), (2048, 2048), (2048, 1024), (1024, 2048), (4096, 1024), (1024, 4096))
MAX_STEPS = 100  # the steps slider's end; the API is held to it too
MAX_CONTEXT_DROP = 8  # the Context Drop factor slider's end (8 x 8 tokens merged); the API is held to it too
GALLERY_SIZE = 24  # images kept in a visitor's gallery, newest first
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SCALING = (("time-aware (as the original: beyond the training area only)", "original"),
           ("always (as diffusers)", "always"), ("off", "off"))  # fmt: skip
# prompts in the bundled model's caption template (see the README's model card); the last in a shorter form
SHAPES_EXAMPLES = (
    "a large red circle in the center on a blue background",
    "a small yellow square in the top left on a black background",
    "a large white triangle in the bottom right on a green background",
    "a small blue circle in the top right on a yellow background",
    "a red square on a white background",
)
OPEN_EXAMPLES = (  # for a model trained on open captions (Lumina-Next)
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a red fox running through fresh snow, morning light, photograph",
    "an old library lit by candles, oil painting",
    "一只在竹林里吃竹子的熊猫",
)


def parser():
    p = cli.Parser(description=__doc__)
    add = p.add_argument
    add("--model", default=DEFAULT_MODEL, help="model folder or hub id, as tools/sample.py (default: the bundled "
        "model)")  # fmt: skip
    add("--text-encoder", help="text encoder folder for an original-format --model (default: the --model folder's)")
    add("--vae", help="SDXL-VAE folder for an original-format --model (default: the --model folder's)")
    add("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and compute dtype")
    add("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on")
    add("--mode", default="graph", choices=["graph", "pynative"], help="MindSpore execution mode")
    add("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens the demo to the network, without a "
        "login (default: 127.0.0.1, this machine only)")  # fmt: skip
    add("--port", type=cli.integer(1, 65535), default=7860, help="port to listen on")
    add("--concurrency", type=cli.integer(1), default=1, help="requests generated at a time, the others wait in the "
        "queue; more than 1 runs the pipeline in several threads at once (more memory; untested)")  # fmt: skip
    add("--max-pixels", type=cli.integer(1), help="largest image area (width x height) a request may ask for "
        "(default: 4 x the model's training area, the largest size in the resolution list)")  # fmt: skip
    return p


# ------------------------------------------------------------------------------------------------------------------
# Requests: what a visitor sent -> SampleSettings, and back to a command line
# ------------------------------------------------------------------------------------------------------------------
def resolutions(train_size: int, multiple: int, max_pixels: int) -> list:
    """(label, "WIDTHxHEIGHT") of ``EXTRAPOLATIONS`` scaled by train_size / 1024, rounded to multiples of
    ``multiple``, without repeats and within ``max_pixels``; the first is the training size."""
    out = []
    for i, (w, h) in enumerate(EXTRAPOLATIONS):
        w, h = (max(multiple, round(v * train_size / 1024 / multiple) * multiple) for v in (w, h))
        value = f"{w}x{h}"
        if w * h <= max_pixels and value not in [v for _, v in out]:
            out.append((f"{value} ({'training size' if i == 0 else 'extrapolation'})", value))
    return out


def parse_resolution(text: str, multiple: int, max_pixels: int) -> tuple:
    """(width, height) of a "WIDTHxHEIGHT" choice; ``ValueError`` saying what is wrong with it."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*(\(.*\))?\s*", str(text or ""))
    if not match:
        raise ValueError(f"resolution {text!r} is not WIDTHxHEIGHT in pixels, e.g. {multiple * 4}x{multiple * 4}")
    width, height = int(match[1]), int(match[2])
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise ValueError(f"resolution {width}x{height}: width and height must be positive multiples of {multiple} "
                         "for this model")  # fmt: skip
    if width * height > max_pixels:
        raise ValueError(f"resolution {width}x{height} is {width * height:,} pixels, more than this server allows "
                         f"({max_pixels:,}, --max-pixels): pick a smaller size")  # fmt: skip
    return width, height


def number(value, name: str, low: float, high: float | None = None, whole: bool = False):
    """``value`` (a number or its text, as a form or the API sends it) as a float, or an int if ``whole``, in
    [low, high]; ``ValueError`` naming ``name`` otherwise."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    bad = isinstance(value, bool) or not math.isfinite(x) or (whole and not x.is_integer())
    if bad or x < low or (high is not None and x > high):
        kind, limits = "a whole number" if whole else "a number", f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {kind} {limits}, got {value!r}")
    return int(x) if whole else x


def request_settings(defaults: SampleSettings, multiple: int, max_pixels: int, resolution, steps, solver, schedule,
                     shift, guidance_scale, scaling, watershed, smooth_rope, proportional_attn, context_drop,
                     context_drop_until, context_drop_layers):  # fmt: skip
    """The ``SampleSettings`` of a request over the model's ``defaults``; ``ValueError`` for a value out of range."""
    width, height = parse_resolution(resolution, multiple, max_pixels)
    settings = dataclasses.replace(
        defaults,
        height=height,
        width=width,
        num_steps=number(steps, "steps (time-grid points)", 2, MAX_STEPS, whole=True),
        solver=solver,
        schedule=schedule,
        shift=number(shift, "time shift", 0.01),
        guidance_scale=number(guidance_scale, "guidance scale", 0),
        scaling=scaling,
        scale_watershed=number(watershed, "watershed", 0, 1),
        smooth_rope=bool(smooth_rope),
        proportional_attn=bool(proportional_attn),
        context_drop=number(context_drop, "Context Drop merge factor", 1, MAX_CONTEXT_DROP, whole=True),
        context_drop_until=number(context_drop_until, "Context Drop window", 0, 1),
        context_drop_layers=str(context_drop_layers or "").strip(),
    )
    settings.validate(multiple)  # solver, schedule and scaling names, Context Drop's layers
    return settings


def request_seed(seed) -> int:
    """The seed a request runs with: its own, or a random one for 0 (or none)."""
    seed = number(0 if seed is None else seed, "seed (0 = random)", 0, cli.SEED_MAX, whole=True)
    return seed or 1 + secrets.randbelow(cli.SEED_MAX)


def sample_command(info: dict, mode: str = "graph", device: str = "CPU") -> str:
    """The ``tools/sample.py`` command line that makes the image ``info`` (its PNG metadata) describes again."""
    s = info["settings"]
    argv = ["python", "tools/sample.py"]
    if os.path.realpath(info["model"]) != os.path.realpath(DEFAULT_MODEL):
        argv += ["--model", info["model"]]
    for flag, key in (("--text-encoder", "text_encoder"), ("--vae", "vae")):
        argv += [flag, info[key]] if info.get(key) else []
    argv += [] if info["dtype"] == "fp32" else ["--dtype", info["dtype"]]
    argv += [] if device == "CPU" else ["--device", device]
    argv += [] if mode == "graph" else ["--mode", mode]
    for flag, text in (("--prompt", info["prompt"]), ("--negative-prompt", info["negative_prompt"])):
        argv += ([f"{flag}={text}"] if text.startswith("-") else [flag, text]) if text else []  # "-x" is no flag
    argv += ["--resolution", f"{s['width']}x{s['height']}", "--steps", str(s["num_steps"]), "--solver", s["solver"],
             "--schedule", s["schedule"], "--shift", repr(s["shift"]), "--cfg", repr(s["guidance_scale"]),
             "--scaling", s["scaling"], "--watershed", repr(s["scale_watershed"]),
             "--context-drop", str(s["context_drop"]), "--context-drop-until", repr(s["context_drop_until"]),
             "--context-drop-layers", s["context_drop_layers"]]  # fmt: skip
    argv += ["--smooth-rope"] if s["smooth_rope"] else []
    argv += [] if s["proportional_attn"] else ["--no-proportional-attn"]
    argv += ["--cfg-all-channels"] if s["guide_all_channels"] else []
    return shlex.join(argv + ["--seed", str(info["seed"])])


# ------------------------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------------------------
class Generator:
    """The loaded pipeline and what the server was started with; ``__call__`` serves one request."""

    def __init__(self, pipe: TextToImagePipeline, args, folder: str, max_pixels: int):
        self.pipe, self.args, self.folder, self.max_pixels = pipe, args, folder, max_pixels
        # (width, height[, Context Drop factor, layers]) the denoiser has graphs for (Context Drop: a second graph)
        self.compiled, self.lock = set(), threading.Lock()

    def __call__(self, prompt: str, negative_prompt: str, seed, settings: SampleSettings, report) -> tuple:
        """(PNG path, its info, seconds per stage, whether the model was compiled first) of one image;
        ``report(done, total, text)`` as it goes (total None: unknown)."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: describe the image to generate")
        seed = request_seed(seed)
        size = (settings.width, settings.height)
        merged = (settings.context_drop, settings.context_drop_layers) if settings.context_drop > 1 else ()
        graph = ms.get_context("mode") == ms.GRAPH_MODE
        with self.lock:  # an offloading pipeline releases its graphs after every image (pipeline.py)
            compiling = graph and (self.pipe.offload or size + merged not in self.compiled)
        report(0, None, f"compiling the model for {size[0]}x{size[1]}: the first image at a size takes longer"
               if compiling else "encoding the prompt")  # fmt: skip
        grid = sampling.time_grid(settings.num_steps, settings.schedule, settings.shift, settings.steepness)
        total = sampling.solver_steps(grid, settings.solver)
        result = self.pipe(prompt, negative_prompt or "", seed=seed, settings=settings, progress=False,
                           callback=lambda i, t, x: report(i + 1, total, f"sampling {size[0]}x{size[1]}"))  # fmt: skip
        with self.lock:
            self.compiled.add(size + merged)
        info = {"prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed, "model": self.args.model,
                "dtype": self.args.dtype, "text_encoder": self.args.text_encoder, "vae": self.args.vae,
                "settings": dataclasses.asdict(settings)}  # fmt: skip
        info = {k: v for k, v in info.items() if v is not None}
        path = os.path.join(self.folder, f"{cli.slug(info['prompt'])}_seed{info['seed']}.png")
        return cli.save_png(result.images[0], path, info), info, result.seconds, compiling

    def unknown_words(self, prompt: str) -> list:
        """The words of ``prompt`` a model with a closed caption vocabulary never saw (the pipeline logs them too)."""
        vocabulary = self.pipe.vocabulary
        return [] if vocabulary is None else sorted(set(words(prompt)) - vocabulary)


def build_page(gr, generator: Generator, examples):
    """The Gradio Blocks page over ``generator``; the Generate button is the API endpoint ``/generate``."""
    pipe, args = generator.pipe, generator.args
    d, multiple = pipe.defaults, pipe.size_multiple
    sizes = resolutions(pipe.train_size, multiple, generator.max_pixels)

    def generate(prompt, negative_prompt, resolution, steps, seed, solver, schedule, shift, guidance_scale, scaling,
                 watershed, smooth_rope, proportional_attn, context_drop, context_drop_until, context_drop_layers,
                 history, progress=gr.Progress()):  # fmt: skip
        try:
            settings = request_settings(d, multiple, generator.max_pixels, resolution, steps, solver, schedule, shift,
                                        guidance_scale, scaling, watershed, smooth_rope, proportional_attn,
                                        context_drop, context_drop_until, context_drop_layers)  # fmt: skip
            unknown = generator.unknown_words(prompt or "")
            if unknown:
                gr.Warning(f"this model never saw {', '.join(map(repr, unknown))} in training and reads them as noise")
            path, info, seconds, compiled = generator(
                prompt, negative_prompt, seed, settings, lambda i, n, text: progress((i, n), desc=text)
            )
        except ValueError as e:  # what the visitor can change; anything else is the server's fault and logged
            raise gr.Error(cli.one_line(e)) from e
        took = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
        status = f"seed {info['seed']}, {settings.width}x{settings.height}: {took}" + (
            " (the denoiser was compiled for this size first)" if compiled else ""
        )
        caption = f"{info['seed']} · {settings.width}x{settings.height} · {prompt}"
        history = ([(path, caption)] + list(history or []))[:GALLERY_SIZE]
        command = sample_command(info, args.mode, args.device)
        return path, info["seed"], status, info, command, path, history, history

    css = "#image img { width: 100%; height: 100%; object-fit: contain; }"  # a small image fills its box too
    css += " #gallery .grid-container { grid-template-columns: repeat(8, minmax(80px, 1fr)) !important; }"  # one: 1/8
    css += " #image img, #gallery img { image-rendering: pixelated; }" if pipe.train_size < 256 else ""
    with gr.Blocks(title="Lumina-Next in MindSpore", analytics_enabled=False) as page:
        name, size = os.path.basename(os.path.normpath(args.model)), pipe.train_size
        gr.Markdown(f"## Lumina-Next in MindSpore\nModel `{name}`, trained at {size}x{size} px; image sides are "
                    f"multiples of {multiple}.")  # fmt: skip
        history = gr.State([])
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", lines=2, placeholder=examples[0], elem_id="prompt")
                negative = gr.Textbox("", label="negative prompt", placeholder="(empty, as the original)")
                with gr.Row():
                    resolution = gr.Dropdown(sizes, value=sizes[0][1], label="resolution (width x height)",
                                             allow_custom_value=True, elem_id="resolution")  # fmt: skip
                    seed = gr.Number(0, label=f"seed, 0..{cli.SEED_MAX} (0 = random)", precision=0)
                steps = gr.Slider(2, MAX_STEPS, d.num_steps, step=1, label="steps (time-grid points)")
                with gr.Row():
                    solver = gr.Dropdown(list(sampling.SOLVERS), value=d.solver, label="solver")
                    schedule = gr.Dropdown(list(sampling.SCHEDULES), value=d.schedule, label="time schedule")
                shift = gr.Slider(0.5, 20, d.shift, step=0.1, label="time shift (the 'shift' schedule)")
                cfg = gr.Slider(0, 20, d.guidance_scale, step=0.1, label="guidance scale")
                with gr.Accordion("advanced", open=False):
                    scaling = gr.Radio(list(SCALING), value=d.scaling, label="RoPE extrapolation")
                    watershed = gr.Slider(0, 1, d.scale_watershed, step=0.05, label="watershed: time-aware RoPE "
                                          "switches from PI to NTK here")  # fmt: skip
                    smooth = gr.Checkbox(d.smooth_rope, label="smooth RoPE (the paper's formula, not the released "
                                         "hard switch)")  # fmt: skip
                    proportional = gr.Checkbox(d.proportional_attn, label="proportional attention")
                    drop = gr.Slider(1, MAX_CONTEXT_DROP, d.context_drop, step=1, label="Context Drop: merge N x N "
                                     "image tokens' keys and values in self-attention (1 = off)")  # fmt: skip
                    drop_until = gr.Slider(0, 1, d.context_drop_until, step=0.05, label="Context Drop while t < this "
                                           "(t = 0 noise, 1 data)")  # fmt: skip
                    drop_layers = gr.Textbox(d.context_drop_layers, label="Context Drop layers: 'all' or indices "
                                             "and ranges from 0, e.g. 0-5,8")  # fmt: skip
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples([[e] for e in examples], inputs=[prompt], label="examples (click one)")
            with gr.Column():
                image = gr.Image(label="image", type="filepath", format="png", height=360, interactive=False,
                                 elem_id="image")  # fmt: skip
                seed_used = gr.Number(label="seed used", precision=0, interactive=False, elem_id="seed-used")
                status = gr.Markdown(elem_id="status")
                command = gr.Code(label="the same image from the command line", language="shell", interactive=False)
                png = gr.File(label="PNG, with these settings in its metadata", interactive=False)
                settings_json = gr.JSON(label="settings")
        gallery = gr.Gallery(label="your earlier images", columns=8, height=240, object_fit="contain", preview=False,
                             elem_id="gallery")  # fmt: skip
        inputs = [prompt, negative, resolution, steps, seed, solver, schedule, shift, cfg, scaling, watershed, smooth,
                  proportional, drop, drop_until, drop_layers, history]  # fmt: skip
        outputs = [image, seed_used, status, settings_json, command, png, gallery, history]
        button.click(generate, inputs, outputs, api_name="generate")
        prompt.submit(generate, inputs, outputs, api_visibility="private")
    return page, css


def listenable(host: str, port: int) -> None:
    """``OSError`` naming --host and --port unless a server can listen there now (before the model is loaded)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        raise OSError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        import gradio as gr
    except ImportError as e:
        raise ValueError(f"the web demo needs Gradio ({e}): pip install -e '.[demo]'") from None
    size_factors(args.model, args.text_encoder, args.vae)  # --model readable as a model, from its config files
    listenable(args.host, args.port)
    if args.host not in LOOPBACK:
        print(f"web_demo.py: warning: --host {args.host} lets every machine that reaches this one use the demo; it has "
              "no login", file=sys.stderr)  # fmt: skip
    backend.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    pipe = TextToImagePipeline.from_pretrained(args.model, args.dtype, args.text_encoder, args.vae)
    max_pixels = args.max_pixels or 4 * pipe.train_size**2
    if max_pixels < pipe.train_size**2:
        raise ValueError(f"--max-pixels {max_pixels} is below the model's training area ({pipe.train_size}^2)")
    bundled = os.path.realpath(args.model) == os.path.realpath(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory(prefix="lumina-web-demo-") as folder:
        page, css = build_page(gr, Generator(pipe, args, folder, max_pixels),
                               SHAPES_EXAMPLES if bundled else OPEN_EXAMPLES)  # fmt: skip
        page.queue(default_concurrency_limit=args.concurrency)
        _, url, _ = page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                                css=css, footer_links=["api"])  # fmt: skip
        print(f"web_demo.py: serving {args.model} at {url} (Ctrl-C stops it)", flush=True)
        try:
            while page.is_running:  # SIGINT / SIGTERM raise cli.Interrupted here (cli.run)
                time.sleep(0.5)
        finally:
            page.close()


if __name__ == "__main__":
    cli.run(main)
