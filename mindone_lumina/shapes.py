"""A synthetic captioned dataset of coloured shapes, and a deterministic detector to score prompt-following.

Used to train and measure the bundled default model: one shape of a colour, size and position on a solid background,
captioned "a small red circle in the top left on a blue background". A fixed set of (shape, colour, background)
combinations never appears in training (``HELDOUT``), so the score measures composition, not memorisation.
"""

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.34, "large": 0.6}  # side of the shape's box as a fraction of the image side
POSITIONS = {  # centre of the shape's box, as fractions of the image side (x, y)
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "center": (0.5, 0.5),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
TRIPLES = tuple((s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b)  # 90 combinations
HELDOUT = frozenset(TRIPLES[i] for i in range(3, len(TRIPLES), 7))  # 13 of 90; every word still seen in training


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"


def caption(scene: Scene) -> str:
    where = "in the center" if scene.position == "center" else f"in the {scene.position}"
    return f"a {scene.size} {scene.colour} {scene.shape} {where} on a {scene.background} background"


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8, drawn at 4x and box-downsampled for anti-aliased edges."""
    from PIL import Image, ImageDraw

    big = size * 4
    im = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(im)
    side = SIZES[scene.size] * big
    cx, cy = (v * big for v in POSITIONS[scene.position])
    cx, cy = min(max(cx, side / 2), big - side / 2), min(max(cy, side / 2), big - side / 2)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return np.asarray(im.resize((size, size), Image.BOX))


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


def parse_prompt(text: str) -> dict:
    """Colour, shape and background named in a prompt (the colour word before the shape and before "background")."""
    words = text.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    if shape is None:
        raise ValueError(f"no shape ({', '.join(SHAPES)}) in prompt {text!r}")
    before = [w for w in words[: words.index(shape)] if w in COLOURS]
    after = [w for w in words[words.index(shape) :] if w in COLOURS]
    if not before or not after:
        raise ValueError(f"prompt {text!r} needs a colour before the shape and a background colour after it")
    return {"shape": shape, "colour": before[-1], "background": after[-1]}


def _nearest_colour(rgb) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(((table - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def detect(image) -> dict:
    """Background, shape colour and shape class of a generated image, by simple geometry.

    Background: nearest named colour to the median border pixel. Shape: the largest connected region of pixels far
    from the background; its colour is the nearest named colour to its median. Its class: a triangle is much narrower
    at the top than at the bottom; a square fills its bounding box and the box's corners, a circle does not.
    """
    from scipy import ndimage

    img = np.asarray(image, np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    far = dist > max(40.0, 0.5 * np.percentile(dist, 99))  # half-way to the shape colour: blur keeps the area
    labels, n = ndimage.label(far)
    if n == 0:
        return {"background": _nearest_colour(bg), "colour": None, "shape": None}
    region = labels == (1 + int(np.argmax(ndimage.sum(far, labels, range(1, n + 1)))))
    core = ndimage.binary_erosion(region) if region.sum() > 30 else region
    colour = _nearest_colour(np.median(img[core if core.any() else region], axis=0))
    ys, xs = np.nonzero(region)
    box = region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    k = max(1, round(0.2 * min(box.shape)))  # corner cells: full for a square, empty for a circle
    corners = np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()])
    rows = max(1, round(0.3 * box.shape[0]))
    taper = box[:rows].mean() / max(box[-rows:].mean(), 1e-6)  # top vs bottom width: ~0.3 triangle, ~1 circle
    shape = "triangle" if taper < 0.6 else "square" if corners > 0.5 or fill > 0.9 else "circle"
    return {"background": _nearest_colour(bg), "colour": colour, "shape": shape}


def score(prompts, images) -> dict:
    """Share of images whose detected background, shape colour and shape class match the prompt."""
    hits = {"background": 0, "colour": 0, "shape": 0}
    for prompt, image in zip(prompts, images):
        want, got = parse_prompt(prompt), detect(image)
        for key in hits:
            hits[key] += want[key] == got[key]
    return {k: v / max(1, len(prompts)) for k, v in hits.items()}
