"""An EMNIST-like public set of handwritten-looking letters, rendered offline with PIL.

PIL's built-in scalable font draws each letter (upper or lower case at random) with a random
size and stroke width, then a random affine jitter (rotation, shear, scale, shift). As in
MNIST/EMNIST preprocessing, the glyph's bounding box is scaled to fit a 20x20 box (for 28x28)
and centred by its centre of mass: white strokes on black. Labels 0..25 are the letters a..z
(case merged, like EMNIST "letters"). Deterministic for a seed; no download.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LETTER_NAMES = [chr(ord("a") + i) for i in range(26)]
_CANVAS = 96


def _render_one(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    char = LETTER_NAMES[label]
    if rng.random() < 0.5:
        char = char.upper()
    font = ImageFont.load_default(size=int(rng.integers(40, 60)))
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    ImageDraw.Draw(canvas).text(
        (_CANVAS / 2, _CANVAS / 2), char, fill=255, font=font, anchor="mm",
        stroke_width=int(rng.integers(1, 5)), stroke_fill=255)
    # inverse affine map (output -> input) about the canvas centre
    angle = math.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.85, 1.15)
    a, b = math.cos(angle) / scale, (math.sin(angle) + shear) / scale
    d, e = -math.sin(angle) / scale, math.cos(angle) / scale
    c0 = _CANVAS / 2
    canvas = canvas.transform(
        canvas.size, Image.Transform.AFFINE,
        (a, b, c0 - a * c0 - b * c0, d, e, c0 - d * c0 - e * c0), resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox()
    if box is None:  # cannot happen for these glyphs, but never return an empty image silently
        raise RuntimeError(f"letter {char!r} rendered empty")
    glyph = canvas.crop(box)
    inner = round(size * 20 / 28)
    w, h = glyph.size
    k = inner / max(w, h)
    glyph = glyph.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS)
    g = np.asarray(glyph, dtype=np.float32)
    ys, xs = np.indices(g.shape)
    cy, cx = (ys * g).sum() / g.sum(), (xs * g).sum() / g.sum()
    top = int(np.clip(round(size / 2 - cy), 0, size - g.shape[0]))
    left = int(np.clip(round(size / 2 - cx), 0, size - g.shape[1]))
    out = np.zeros((size, size), dtype=np.uint8)
    out[top:top + g.shape[0], left:left + g.shape[1]] = np.asarray(glyph, dtype=np.uint8)
    return out


def render_letters(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render n letters -> (uint8 images [n, size, size], int64 labels [n] in 0..25, names a..z).

    Classes are balanced (label i for example i mod 26, then shuffled).
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 26).astype(np.int64)
    images = np.stack([_render_one(rng, int(y), size) for y in labels]) if n else np.zeros((0, size, size), np.uint8)
    return images, labels, list(LETTER_NAMES)
