"""An EMNIST-like public set of handwritten-looking letters, rendered offline with PIL.

A font (PIL's built-in scalable font, or one drawn at random from a font set, see
:func:`font_files`) draws each letter (upper or lower case at random) with a random size and
stroke width, then a random affine jitter (rotation, shear, scale, shift). As in MNIST/EMNIST
preprocessing, the glyph's bounding box is scaled to fit a 20x20 box (for 28x28) and centred by
its centre of mass: white strokes on black. An optional elastic distortion (Simard et al. 2003:
a random displacement field smoothed by a Gaussian, ``alpha`` pixels strong at 28x28) then
bends the strokes the way handwriting does. Labels 0..25 are the letters a..z (case merged,
like EMNIST "letters"). Deterministic for a seed and a font set; no download.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LETTER_NAMES = [chr(ord("a") + i) for i in range(26)]
_CANVAS = 96
FONT_SETS = ("default", "matplotlib")
# the text faces among the fonts matplotlib ships (mpl-data/fonts/ttf); symbol and math faces left out
MATPLOTLIB_TEXT_FONTS = tuple(
    [f"DejaVu{family}{style}" for family in ("Sans", "SansMono")
     for style in ("", "-Bold", "-Oblique", "-BoldOblique")]
    + [f"DejaVuSerif{style}" for style in ("", "-Bold", "-Italic", "-BoldItalic")]
    + [f"STIXGeneral{style}" for style in ("", "Bol", "Italic", "BolIta")]
    + ["cmr10", "cmb10", "cmss10", "cmtt10", "cmti10"])
ELASTIC_SIGMA = 4.0  # smoothing of the displacement field, pixels at 28x28 (Simard et al.)


def font_files(fonts: str) -> list[Optional[str]]:
    """The font files of a font set: ``default`` -> ``[None]`` (PIL's built-in font);
    ``matplotlib`` -> the text faces that ship inside the installed matplotlib; else a folder,
    every ``.ttf``/``.otf`` in it (sorted). Raises ValueError naming what is missing."""
    if fonts == "default":
        return [None]
    if fonts == "matplotlib":
        try:
            import matplotlib
        except ImportError:
            raise ValueError("the 'matplotlib' font set needs matplotlib installed (pip install matplotlib)") from None
        folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        files = [folder / f"{name}.ttf" for name in MATPLOTLIB_TEXT_FONTS]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{folder}: missing {', '.join(missing)} (another matplotlib version?)")
        return [str(f) for f in files]
    folder = Path(fonts)
    files = sorted(str(f) for f in folder.glob("*") if f.suffix.lower() in (".ttf", ".otf")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"{fonts!r} is neither a font set ({', '.join(FONT_SETS)}) nor a folder of .ttf/.otf fonts")
    return files


@lru_cache(maxsize=512)
def _font(path: Optional[str], size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


@lru_cache(maxsize=8)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix of a 1-D Gaussian blur (normalised kernel, reflected borders): ``B @ v``."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    reflect = np.pad(np.arange(n), radius, mode="reflect")  # source index of each padded position
    matrix = np.zeros((n, n))
    for i in range(n):
        np.add.at(matrix[i], reflect[i:i + 2 * radius + 1], kernel)
    return matrix


def _smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (separable, normalised kernel, reflected borders) of a 2-D field."""
    return _blur_matrix(field.shape[0], sigma) @ field @ _blur_matrix(field.shape[1], sigma).T


def elastic(image: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Warp a [H, W] image by a random displacement field (uniform in [-1, 1] per pixel, smoothed
    by a Gaussian of ``sigma`` pixels, scaled by ``alpha`` pixels); bilinear, zero outside."""
    h, w = image.shape
    dy = _smooth(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dx = _smooth(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    ys, xs = np.indices((h, w))
    y, x = ys + dy, xs + dx
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    padded = np.pad(image.astype(np.float32), 1)  # a zero border: samples outside read 0

    def at(yy, xx):
        return padded[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]
    out = ((1 - fy) * (1 - fx) * at(y0, x0) + (1 - fy) * fx * at(y0, x0 + 1)
           + fy * (1 - fx) * at(y0 + 1, x0) + fy * fx * at(y0 + 1, x0 + 1))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _render_one(rng: np.random.Generator, label: int, size: int, fonts: list[Optional[str]],
                alpha: float) -> np.ndarray:
    char = LETTER_NAMES[label]
    if rng.random() < 0.5:
        char = char.upper()
    path = fonts[int(rng.integers(len(fonts)))] if len(fonts) > 1 else fonts[0]
    font = _font(path, int(rng.integers(40, 60)))
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
    if alpha > 0:
        out = elastic(out, rng, alpha * size / 28, ELASTIC_SIGMA * size / 28)
    return out


def render_letters(n: int, size: int = 28, seed: int = 0, fonts: str = "default",
                   elastic_alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render n letters -> (uint8 images [n, size, size], int64 labels [n] in 0..25, names a..z).

    Classes are balanced (label i for example i mod 26, then shuffled). ``fonts``: a font set or
    folder (:func:`font_files`), one font drawn per letter; ``elastic_alpha``: the elastic
    distortion's strength in pixels at 28x28 (0: none; Simard et al. used 34).
    """
    if n < 0 or size < 8 or elastic_alpha < 0:
        raise ValueError(f"need n >= 0, size >= 8, elastic_alpha >= 0, got n={n}, size={size}, "
                         f"elastic_alpha={elastic_alpha}")
    files = font_files(fonts)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 26).astype(np.int64)
    images = (np.stack([_render_one(rng, int(y), size, files, elastic_alpha) for y in labels]) if n
              else np.zeros((0, size, size), np.uint8))
    return images, labels, list(LETTER_NAMES)
