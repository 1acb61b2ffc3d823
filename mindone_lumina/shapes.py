"""A synthetic captioned dataset of coloured shapes, and a deterministic detector to score prompt-following.

Used to train and measure the bundled default model: one shape of a colour, size and position on a solid background.
Captions come in four forms by what they name besides colour, shape and background (``FORMS``: neither size nor
position, size, position, both) and in several phrasings and word orders each ("a red circle on a blue background",
"red circle, blue background", "a blue background with a small red circle in the top left", ...). A fixed set of
(shape, colour, background) combinations never appears in training (``HELDOUT``), so the score measures composition,
not memorisation.

``caption(scene)`` without an ``rng`` is the canonical long caption; ``render`` without one draws no layout jitter.

New concepts (``NEW_SHAPES``: the hexagon, the bar) are shapes the default model never saw, for a fine-tune (LoRA) to
teach it. The bundled 4x VAE, trained on the old shapes only, loses the hexagon's corners (its reconstructions of
hexagon images are called hexagons 14% of the time), so no denoiser can draw one through it; a bar (a horizontal
rectangle 0.4 as tall as wide) keeps its aspect through the VAE (0.40-0.58 reconstructed), which is what a fine-tune
of the denoiser alone can learn and the detector can read.
They stay out of ``SHAPES``, ``TRIPLES``, ``HELDOUT`` and the scene lists above, so the default model's training data
and evaluation are unchanged. A concept has its own scenes over every (colour, background) pair of ``PAIRS``
(``concept_scenes``) and its own held-out split: ``CONCEPT_HELDOUT`` pairs never drawn in its training scenes
(``concept_train_scenes``), only in ``concept_heldout_scenes`` and their captions ``concept_prompts``, so the score
measures whether the fine-tune composes the new word with known colours rather than memorising pairs.
"""

import re
from dataclasses import dataclass

import numpy as np

from .text.tokenizers import words as caption_words

COLOURS = {  # pairwise RGB distance >= 190, so blur and noise do not move a pixel to another name
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("hexagon", "bar")  # concepts the default model never saw, for fine-tunes (LoRA) to teach it
BAR_ASPECT = 0.4  # a bar's height / width
BAR_BELOW = 0.7  # detect: a region this much wider than tall (or taller than wide) is a bar
# detect: ... if it fills this much of the rectangle of its widest row and tallest column (a formless elongated blob
# does not: 7% of thresholded noise blobs pass, 26% without it; the fine-tuned model's bars score the same)
BAR_FILL = 0.8
SIZES = {"small": 0.34, "large": 0.6}  # side of the shape's box as a fraction of the image's shorter side
POSITIONS = {  # centre of the shape's box, as fractions of the image's width and height (x, y)
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "center": (0.5, 0.5),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
TRIPLES = tuple((s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b)  # 90 combinations
HELDOUT = frozenset(TRIPLES[i] for i in range(3, len(TRIPLES), 7))  # 13 of 90; every word still seen in training
PAIRS = tuple((c, b) for c in COLOURS for b in COLOURS if c != b)  # 30 (colour, background) pairs
# 5 of 30, a concept's held-out pairs: each colour at most once as the shape's and once as the background's
CONCEPT_HELDOUT = frozenset(PAIRS[i] for i in range(3, len(PAIRS), 6))
# What a caption names besides colour, shape and background, and the share of each form in the training captions
FORMS = {"plain": 0.35, "size": 0.15, "position": 0.15, "full": 0.35}
PHRASINGS = (  # {subject}: "[size] colour shape", {where}: " in the <position>" or nothing; the first is canonical
    "a {subject}{where} on a {background} background",
    "{subject}{where}, {background} background",
    "a {background} background with a {subject}{where}",
    "a {subject}{where} against {background}",
    "a {subject}{where} on {background}",
)
SIZE_JITTER, POSITION_JITTER = 0.08, 0.04  # relative side, and centre shift as a fraction of the image side
HEXAGON_MARGIN = 0.95  # detect: a hexagon's ideal shape must fit at least 5% better than a circle's (see there)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"

    def __post_init__(self):
        for field, value, allowed in (
            ("shape", self.shape, SHAPES + NEW_SHAPES),
            ("colour", self.colour, COLOURS),
            ("background", self.background, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"shape colour and background are both {self.colour!r}; the shape would be invisible")


def caption(scene: Scene, rng: np.random.Generator | None = None, form: str | None = None) -> str:
    """The scene in caption ``form`` (drawn from ``FORMS``' shares when None and an ``rng`` is given; "full"
    otherwise) and a phrasing drawn with ``rng`` (the canonical one without)."""
    if form is None:
        form = "full" if rng is None else list(FORMS)[int(rng.choice(len(FORMS), p=list(FORMS.values())))]
    if form not in FORMS:
        raise ValueError(f"unknown caption form {form!r}; expected one of {', '.join(FORMS)}")
    phrasing = PHRASINGS[0] if rng is None else PHRASINGS[int(rng.integers(len(PHRASINGS)))]
    subject = " ".join(([scene.size] if form in ("size", "full") else []) + [scene.colour, scene.shape])
    where = f" in the {scene.position}" if form in ("position", "full") else ""
    return phrasing.format(subject=subject, where=where, background=scene.background)


def render(scene: Scene, size: int | tuple = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W, 3) uint8 for ``size`` = H = W or (H, W), drawn at 4x and box-downsampled for anti-aliased edges. With
    ``rng``, the shape's side and centre are jittered by up to ``SIZE_JITTER`` and ``POSITION_JITTER``, little enough
    to keep every word true."""
    from PIL import Image, ImageDraw

    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 16:
        raise ValueError(f"image size {size} is below 16 px: a small shape would be too few pixels to recognise")
    bh, bw = height * 4, width * 4
    im = Image.new("RGB", (bw, bh), COLOURS[scene.background])
    draw = ImageDraw.Draw(im)
    side = SIZES[scene.size] * min(bh, bw)
    cx, cy = POSITIONS[scene.position][0] * bw, POSITIONS[scene.position][1] * bh
    if rng is not None:
        side *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        cx, cy = (v + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * extent for v, extent in ((cx, bw), (cy, bh)))
    cx, cy = min(max(cx, side / 2), bw - side / 2), min(max(cy, side / 2), bh - side / 2)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    elif scene.shape == "bar":  # as wide as the side, BAR_ASPECT of it tall
        draw.rectangle((box[0], cy - side * BAR_ASPECT / 2, box[2], cy + side * BAR_ASPECT / 2), fill=fill)
    else:  # hexagon: flat top and bottom, as wide as the side, sqrt(3)/2 of it tall
        dy = side * 3**0.5 / 4
        draw.polygon(
            [(box[0], cy), (cx - side / 4, cy - dy), (cx + side / 4, cy - dy), (box[2], cy), (cx + side / 4, cy + dy),
             (cx - side / 4, cy + dy)],
            fill=fill,
        )  # fmt: skip
    return np.asarray(im.resize((width, height), Image.BOX))


def _scenes(triples, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    sizes, positions = list(SIZES), list(POSITIONS)
    out = []
    for _ in range(n):
        shape, colour, background = triples[rng.integers(len(triples))]
        out.append(Scene(shape, colour, background, sizes[rng.integers(2)], positions[rng.integers(len(positions))]))
    return out


def train_scenes(n: int, seed: int = 0) -> list:
    return _scenes([t for t in TRIPLES if t not in HELDOUT], n, seed)


def heldout_scenes(n: int, seed: int = 0) -> list:
    return _scenes(sorted(HELDOUT), n, seed)


def heldout_prompts(n: int, form: str, seed: int = 0) -> list:
    """``n`` captions of held-out scenes in caption ``form``, phrasings drawn from (seed, form): the evaluation set."""
    rng = np.random.default_rng([seed, list(FORMS).index(form) if form in FORMS else -1])
    return [caption(scene, rng, form) for scene in heldout_scenes(n, seed)]


def concept_scenes(shape: str, n: int, seed: int = 0, pairs=PAIRS) -> list:
    """``n`` scenes of ``shape`` over the (colour, background) ``pairs`` (default: all), sizes and positions, drawn as
    ``train_scenes`` draws its own."""
    return _scenes([(shape, c, b) for c, b in pairs], n, seed)


def _new_shape(shape: str) -> str:
    if shape not in NEW_SHAPES:  # an old shape's held-out combinations are HELDOUT's, not CONCEPT_HELDOUT's
        raise ValueError(f"{shape!r} is no new concept; expected one of {', '.join(NEW_SHAPES)}")
    return shape


def concept_train_scenes(n: int, seed: int = 0, shape: str = "hexagon") -> list:
    """Scenes of the new ``shape`` for a fine-tune to learn it: every pair but ``CONCEPT_HELDOUT``."""
    return concept_scenes(_new_shape(shape), n, seed, [p for p in PAIRS if p not in CONCEPT_HELDOUT])


def concept_heldout_scenes(n: int, seed: int = 0, shape: str = "hexagon") -> list:
    """Scenes of the new ``shape`` in the ``CONCEPT_HELDOUT`` pairs only, never in ``concept_train_scenes``."""
    return concept_scenes(_new_shape(shape), n, seed, sorted(CONCEPT_HELDOUT))


def concept_prompts(n: int, form: str, seed: int = 0, shape: str = "hexagon") -> list:
    """``n`` captions of ``concept_heldout_scenes`` in caption ``form``, phrasings drawn from (seed, form) as
    ``heldout_prompts`` draws them: the evaluation set of a fine-tune teaching ``shape``."""
    rng = np.random.default_rng([seed, list(FORMS).index(form) if form in FORMS else -1])
    return [caption(scene, rng, form) for scene in concept_heldout_scenes(n, seed, shape)]


def parse_prompt(text: str) -> dict:
    """Shape, colour and background named in a prompt, plus size and position when it names them.

    The background is the colour word right before "background", else the last colour word after the shape; the shape
    colour is the nearest other colour word before the shape.
    """
    words = caption_words(text)
    named = {w for w in words if w in SHAPES + NEW_SHAPES}
    if len(named) != 1:
        known = ", ".join(SHAPES + NEW_SHAPES)
        raise ValueError(f"prompt {text!r} names {len(named)} shapes; expected exactly one of {known}")
    at = words.index(named.pop())
    colours = [i for i, w in enumerate(words) if w in COLOURS]
    if "background" in words and words.index("background") - 1 in colours:
        bg = words.index("background") - 1
    else:
        bg = next((i for i in reversed(colours) if i > at), None)
    fg = next((i for i in reversed(colours) if i < at and i != bg), None)
    if bg is None or fg is None:
        raise ValueError(f"prompt {text!r} needs a colour before the shape and a background colour")
    out = {"shape": words[at], "colour": words[fg], "background": words[bg]}
    size = next((w for w in words if w in SIZES), None)
    position = next((p for p in POSITIONS if re.search(rf"\b{p}\b", " ".join(words))), None)
    return out | ({"size": size} if size else {}) | ({"position": position} if position else {})


def _nearest_colours(rgb) -> np.ndarray:
    """Index into ``COLOURS`` of the nearest named colour of each (..., 3) pixel."""
    table = np.array(list(COLOURS.values()), np.float32)
    return np.argmin(((np.asarray(rgb, np.float32)[..., None, :] - table) ** 2).sum(-1), axis=-1)


def _skewness(mass) -> float:
    """Skewness of a 1-D mass profile: 0 for a symmetric shape; a symmetric blur keeps the third moment."""
    p = mass / max(mass.sum(), 1e-6)
    at = np.arange(len(mass)) - (p * np.arange(len(mass))).sum()
    return float((p * at**3).sum() / max((p * at**2).sum(), 1e-6) ** 1.5)


def _template(shape: str, box, hw, supersample: int = 4) -> np.ndarray:
    """Coverage (0..1) of each pixel of an ``hw`` image by the ideal ``shape`` in box (top, bottom, left, right)."""
    top, bottom, left, right = box
    y = ((np.arange(hw[0] * supersample) + 0.5) / supersample)[:, None]
    x = ((np.arange(hw[1] * supersample) + 0.5) / supersample)[None, :]
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
    if shape in ("square", "bar"):
        inside = (abs(x - cx) <= rx) & (abs(y - cy) <= ry)
    elif shape == "circle":
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    elif shape == "triangle":
        inside = (y <= bottom) & (abs(x - cx) <= (y - top) / (bottom - top) * rx)
    else:  # hexagon: corners at the middle of the left and right sides, flat top and bottom half as wide as the box
        inside = (abs(y - cy) <= ry) & (abs(x - cx) <= rx * (1 - abs(y - cy) / ry / 2))
    return inside.reshape(hw[0], supersample, hw[1], supersample).mean((1, 3))


def _fit_error(shape: str, alpha, blurs=tuple(np.linspace(0, 2, 21))) -> float:
    """Squared error between the shape shares ``alpha`` and the ideal ``shape`` (circle or hexagon) of the same area
    (its sum) centred at its centroid, blurred by whichever gaussian sigma (pixels) of ``blurs`` fits best (a 0.1 px
    grid: a coarse one favours whichever shape its sigmas happen to suit). Area and centroid are sub-pixel and survive
    blur, so two shapes a pixel apart in extent can be told apart."""
    from scipy import ndimage

    area = float(alpha.sum())
    ys, xs = np.indices(alpha.shape) + 0.5
    cy, cx = float((alpha * ys).sum()) / area, float((alpha * xs).sum()) / area
    if shape == "circle":
        rx = ry = np.sqrt(area / np.pi)
    else:  # a regular hexagon of circumradius R covers 3 * sqrt(3) / 2 * R^2; flat top: R wide, sqrt(3) / 2 R tall
        rx = np.sqrt(area / (1.5 * np.sqrt(3)))
        ry = rx * np.sqrt(3) / 2
    ideal = _template(shape, (cy - ry, cy + ry, cx - rx, cx + rx), alpha.shape)
    return min(float(((ndimage.gaussian_filter(ideal, s, mode="constant") - alpha) ** 2).sum()) for s in blurs)


def detect(image) -> dict:
    """Background, shape colour, shape class, size and position of a generated image, by simple geometry.

    Background: the most common named colour on the border. ``count``: how many separate shapes are drawn (a model
    extrapolating badly repeats the shape). Shape: the largest connected region of pixels far from the background;
    its colour is the nearest named colour to its median. Geometry uses each pixel's share of shape colour near that
    region (soft, so blur and anti-aliasing move mass without losing it): a triangle's mass profile is skewed, a
    circle's and a square's are not; a square fills the rectangle of its widest row and tallest column, a circle
    only pi/4 of it; a region whose widest row and tallest column differ by more than ``BAR_BELOW`` is a bar (the
    other shapes have square boxes). A hexagon (``NEW_SHAPES``) passes those rules as a circle, so a circle is a
    hexagon when an ideal hexagon of the region's mass, centred at its centroid, fits the shares at least 5% better
    (squared error, ``HEXAGON_MARGIN``) than such a circle, each blurred as much as fits it best (``_fit_error``):
    only circle verdicts can change, and rendered circles keep theirs clean, jittered and after a 3x3 blur with
    noise (a few 8 px ones after a 5x5 blur with noise 16/255 do not). The aspect (0.87 against 1) would be the
    obvious cue, but the widest rows of a hexagon are its pointed middle, which pixels and blur cut short: small
    ones (8-11 px wide) measure 0.90-0.99 clean and up to 1.06 blurred, where blurred circles go down to 0.91. The
    class is None when the region overlaps that class's ideal shape in its bounding box by less than half (IoU), so
    a formless blob counts as a miss for every prompt. Size and position: the nearest in ``SIZES`` to that side
    (relative to the shorter image side) and in ``POSITIONS`` to the region's bounding-box centre.
    """
    from scipy import ndimage

    names = list(COLOURS)
    img = np.asarray(image, np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    votes = _nearest_colours(border)
    mode = int(np.bincount(votes, minlength=len(names)).argmax())  # a large shape may cover part of the border
    bg = np.median(border[votes == mode], axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    far = dist > max(40.0, 0.5 * np.percentile(dist, 99))  # half-way to the shape colour: blur keeps the area
    labels, n = ndimage.label(far)
    if n == 0:
        return {"background": names[mode], "colour": None, "shape": None, "size": None, "position": None, "count": 0}
    areas = ndimage.sum(far, labels, range(1, n + 1))
    region = labels == (1 + int(np.argmax(areas)))
    # shapes drawn: regions of at least a quarter of the largest one's area (specks and seams are not shapes)
    count = int((areas >= max(4.0, 0.25 * areas.max())).sum())
    core = ndimage.binary_erosion(region) if region.sum() > 30 else region  # edge pixels are blends with the bg
    fg = np.median(img[core if core.any() else region], axis=0)
    span = fg - bg
    near = ndimage.binary_dilation(region, iterations=2)  # blur spreads the shape by a pixel or two, noise elsewhere
    alpha = np.clip((img - bg) @ span / max(float(span @ span), 1.0), 0, 1) * near  # share of shape in each pixel
    rows, cols = alpha.sum(1), alpha.sum(0)
    width, height = (np.sort(v)[-3:].mean() for v in (rows, cols))  # widest rows, tallest columns: blur keeps them
    fill = alpha.sum() / max(width * height, 1e-6)  # square 1, circle pi/4
    skew = max(abs(_skewness(rows)), abs(_skewness(cols)))  # triangle 0.57 (0.25 after a 5x5 blur), others < 0.07
    shape = "triangle" if skew > 0.15 else "circle" if fill < 0.89 else "square"
    if min(width, height) < BAR_BELOW * max(width, height) and fill >= BAR_FILL:  # before the skew: see BAR_BELOW
        shape = "bar"  # the old shapes' boxes are square; a bar's keeps its aspect through blur and the VAE
    ys, xs = np.nonzero(region)
    if shape == "circle":  # or a hexagon, which the rules above call a circle: the closer ideal shape decides
        top, bottom, left, right = max(ys.min() - 4, 0), ys.max() + 5, max(xs.min() - 4, 0), xs.max() + 5
        window = alpha[top:bottom, left:right]  # all of the shape's mass, and room for a blurred template's edge
        if _fit_error("hexagon", window) < HEXAGON_MARGIN * _fit_error("circle", window):
            shape = "hexagon"
    ideal = _template(shape, (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1), region.shape) > 0.5
    iou = (ideal & (alpha > 0.5)).sum() / max((ideal | (alpha > 0.5)).sum(), 1)
    if iou < 0.5:  # a blob is no shape: rendered shapes score >= 0.72 clean, >= 0.52 after a 5x5 blur at 32 px
        shape = None
    side = max(width, height) / min(img.shape[:2])
    centre = np.array([(xs.min() + xs.max() + 1) / img.shape[1], (ys.min() + ys.max() + 1) / img.shape[0]]) / 2
    return {
        "background": names[mode],
        "colour": names[int(_nearest_colours(fg))],
        "shape": shape,
        "size": min(SIZES, key=lambda s: abs(np.log(SIZES[s] / side))),
        "position": min(POSITIONS, key=lambda p: float(np.sum((np.array(POSITIONS[p]) - centre) ** 2))),
        "count": count,
    }


def score(prompts, images) -> dict:
    """Share of images whose detected background, shape colour and shape class match the prompt; size and position
    over the prompts that name them (None when none does); ``duplicated``: share of images with more than one shape."""
    hits, counts = dict.fromkeys(("background", "colour", "shape", "size", "position"), 0), {}
    duplicated = 0
    for prompt, image in zip(prompts, images):
        want, got = parse_prompt(prompt), detect(image)
        for key, value in want.items():
            hits[key] += value == got[key]
            counts[key] = counts.get(key, 0) + 1
        duplicated += got["count"] > 1
    out = {k: hits[k] / counts[k] if counts.get(k) else None for k in hits}
    return out | {"duplicated": duplicated / max(len(prompts), 1)}
