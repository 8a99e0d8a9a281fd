"""Procedural rendering of one demo-world image: a textured object on a textured ground.

Everything is numpy on a 64x64-ish grid, one image at a time, driven by a
``numpy.random.Generator`` that the caller seeds per image. Per-image seeding keeps an
image's pixels independent of how many images are rendered together, so a world is
byte-identical for a seed whatever the batch size.

The look is deliberately not clip-art: multi-octave value noise in every texture, a
global light gradient and colour cast, a soft drop shadow, shading across the object,
camera noise, and sometimes a branch lying across the object (partial occlusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Base RGB colours in [0, 1]; each image jitters them.
OBJECT_RGB = {
    "red": (0.84, 0.14, 0.12),
    "green": (0.22, 0.68, 0.18),
    "blue": (0.16, 0.30, 0.88),
    "yellow": (0.95, 0.83, 0.14),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.96, 0.50, 0.10),
    "white": (0.93, 0.93, 0.93),
    "black": (0.10, 0.10, 0.10),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("water", "grass", "sand", "snow", "rock")
SIZE_RADIUS = {"small": (10.0, 13.0), "large": (16.0, 21.0)}
MAX_SHIFT = 9.0  # pixels (at 64px) the object's centre may move from the image centre
BG_CONTRAST = 0.5
RIM_DARKENING = 0.85
MAX_TILT = 0.15  # radians; objects stand roughly upright, as most photographed objects do
# (a wider tilt made shape far slower to learn for the demo's small ViT: docs/demo-world.md)


@dataclass(frozen=True)
class Scene:
    """What to draw; the renderer chooses the continuous nuisances (position, angle, light)."""

    shape: str
    color: str
    pattern: str
    size: str
    background: str
    occluded: bool


@lru_cache(maxsize=32)
def _upsampler(cells: int, size: int) -> np.ndarray:
    """(size, cells+1) linear interpolation matrix: smooth noise is U @ grid @ U.T."""
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 1)
    frac = pos - lo
    u = np.zeros((size, cells + 1), dtype=np.float32)
    u[np.arange(size), lo] = 1.0 - frac
    u[np.arange(size), lo + 1] = frac
    return u


def value_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int | None = None) -> np.ndarray:
    """Smooth noise in [-1, 1] with about ``cells`` bumps across the image per axis."""
    cells_x = cells_y if cells_x is None else cells_x
    grid = rng.uniform(-1.0, 1.0, (cells_y + 1, cells_x + 1)).astype(np.float32)
    return _upsampler(cells_y, size) @ grid @ _upsampler(cells_x, size).T


def fractal_noise(rng: np.random.Generator, size: int, octaves: tuple[int, ...] = (3, 6, 12, 24)) -> np.ndarray:
    """Sum of value-noise octaves with halving amplitude, roughly in [-1, 1]."""
    total = np.zeros((size, size), dtype=np.float32)
    amp, norm = 1.0, 0.0
    for cells in octaves:
        total += amp * value_noise(rng, size, cells)
        norm += amp
        amp *= 0.5
    return total / norm


def _jitter(rgb, rng: np.random.Generator, spread: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32), 0.0, 1.0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1.0 - t[..., None]) + b * t[..., None]


def background_texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """An (size, size, 3) float texture for one ground type."""
    yy, xx = _grid(size)
    if name == "water":
        deep, light = _jitter((0.06, 0.28, 0.52), rng, 0.05), _jitter((0.25, 0.55, 0.75), rng, 0.05)
        warp = value_noise(rng, size, 3) * rng.uniform(1.0, 2.5)
        period = rng.uniform(5.0, 9.0)
        waves = np.sin(2 * np.pi * (yy / period + 0.15 * xx / period * rng.uniform(-1, 1)) + warp + rng.uniform(0, 6.3))
        t = np.clip(0.5 + 0.35 * waves + 0.25 * fractal_noise(rng, size, (4, 8)), 0, 1)
        img = _mix(deep[None, None], light[None, None], t)
        glint = np.clip((waves - 0.85) * 4.0, 0, 1) * (value_noise(rng, size, 6) > 0.2)
        return img + 0.35 * glint[..., None]
    if name == "grass":
        dark, light = _jitter((0.10, 0.30, 0.07), rng, 0.04), _jitter((0.40, 0.65, 0.20), rng, 0.05)
        blades = value_noise(rng, size, int(rng.integers(4, 8)), int(rng.integers(24, 40)))
        clumps = value_noise(rng, size, 4)
        t = np.clip(0.5 + 0.45 * blades + 0.25 * clumps + 0.15 * rng.standard_normal((size, size)), 0, 1)
        return _mix(dark[None, None], light[None, None], t.astype(np.float32))
    if name == "sand":
        base, shade = _jitter((0.86, 0.74, 0.52), rng, 0.04), _jitter((0.68, 0.55, 0.36), rng, 0.04)
        angle = rng.uniform(0, np.pi)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        ripples = np.sin(2 * np.pi * along / rng.uniform(9.0, 15.0) + 1.5 * value_noise(rng, size, 3))
        t = np.clip(0.35 + 0.25 * ripples + 0.2 * fractal_noise(rng, size), 0, 1)
        grain = 0.07 * rng.standard_normal((size, size)).astype(np.float32)
        return _mix(base[None, None], shade[None, None], t) + grain[..., None]
    if name == "snow":
        white, shadow = _jitter((0.95, 0.96, 0.98), rng, 0.02), _jitter((0.70, 0.78, 0.92), rng, 0.04)
        t = np.clip(0.3 + 0.45 * fractal_noise(rng, size, (2, 4, 8)), 0, 1)
        img = _mix(white[None, None], shadow[None, None], t)
        sparkle = (rng.random((size, size)) > 0.985).astype(np.float32) * 0.25
        return img + sparkle[..., None] + 0.02 * rng.standard_normal((size, size, 1)).astype(np.float32)
    if name == "rock":
        dark, light = _jitter((0.30, 0.29, 0.28), rng, 0.04), _jitter((0.58, 0.56, 0.53), rng, 0.04)
        cracks = np.abs(value_noise(rng, size, 6)) < 0.06
        t = np.clip(0.5 + 0.5 * fractal_noise(rng, size, (4, 8, 16, 32)), 0, 1)
        img = _mix(dark[None, None], light[None, None], t)
        return img * np.where(cracks, 0.55, 1.0)[..., None].astype(np.float32)
    raise ValueError(f"unknown background {name!r}")


def shape_sdf(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float, angle: float) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) to a rotated shape."""
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    if shape == "circle":
        return np.sqrt(u * u + v * v) - radius
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.82 * radius
    if shape in ("triangle", "hexagon"):
        sides = 3 if shape == "triangle" else 6
        outer = (1.2 if sides == 3 else 0.97) * radius
        apothem = outer * np.cos(np.pi / sides)
        dists = [u * np.cos(2 * np.pi * k / sides + np.pi / 2) + v * np.sin(2 * np.pi * k / sides + np.pi / 2)
                 for k in range(sides)]
        return np.max(np.stack(dists), axis=0) - apothem
    if shape == "star":
        outer, inner, points = 1.25 * radius, 0.52 * radius, 5
        sector = 2 * np.pi / points
        theta = np.mod(np.arctan2(v, u) + np.pi / 2, sector) - sector / 2
        rho = np.sqrt(u * u + v * v)
        pu, pv = rho * np.cos(theta), np.abs(rho * np.sin(theta))
        # The edge from the tip (outer, 0) to the inner vertex; inside is the origin's side.
        iu, iv = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
        nu, nv = iv, outer - iu
        norm = np.hypot(nu, nv)
        return ((pu - outer) * nu + pv * nv) / norm
    if shape == "cross":
        arm, half = 0.95 * radius, 0.36 * radius
        bar1 = np.maximum(np.abs(u) - arm, np.abs(v) - half)
        bar2 = np.maximum(np.abs(v) - arm, np.abs(u) - half)
        return np.minimum(bar1, bar2)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Where the pattern's second colour shows, in [0, 1]."""
    if pattern == "plain":
        return np.zeros_like(yy)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if pattern == "striped":
        period = rng.uniform(4.5, 6.5)
        return np.clip(2.5 * np.sin(2 * np.pi * u / period), 0, 1)
    if pattern == "dotted":
        spacing = rng.uniform(5.0, 6.5)
        du = np.mod(u + rng.uniform(0, spacing), spacing) - spacing / 2
        dv = np.mod(v + rng.uniform(0, spacing), spacing) - spacing / 2
        return np.clip(rng.uniform(1.4, 1.9) + 0.5 - np.sqrt(du * du + dv * dv), 0, 1)
    if pattern == "checkered":
        cell = rng.uniform(3.5, 5.0)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render ``scene``; returns ``(image uint8 (size, size, 3), visible-object mask bool (size, size))``."""
    scale = size / 64.0
    yy, xx = _grid(size)
    img = background_texture(scene.background, rng, size)
    # Grounds keep their colour and grain but at low contrast, as an out-of-focus ground
    # behind an object would: strong texture edges drown the object's outline otherwise.
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = mean + BG_CONTRAST * (img - mean)

    lo, hi = SIZE_RADIUS[scene.size]
    radius = rng.uniform(lo, hi) * scale
    margin = radius * 1.15 + 1.0
    reach = max(min(MAX_SHIFT * scale, size / 2 - margin), 0.0)
    cy, cx = size / 2 + rng.uniform(-reach, reach, 2)
    angle = rng.uniform(-MAX_TILT, MAX_TILT)
    sdf = shape_sdf(scene.shape, yy, xx, cy, cx, radius, angle)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)

    # Soft drop shadow: the object's silhouette, offset and blurred by a wider edge.
    off = rng.uniform(1.0, 2.5, 2) * scale
    shadow = np.clip(0.5 - shape_sdf(scene.shape, yy, xx, cy + off[0], cx + off[1], radius, angle) / 2.5, 0, 1)
    img = img * (1.0 - 0.35 * shadow)[..., None]

    base = _jitter(OBJECT_RGB[scene.color], rng, 0.07) * rng.uniform(0.85, 1.1)
    second = base * rng.uniform(0.25, 0.45) if rng.random() < 0.7 else 0.55 * base + 0.45
    obj = _mix(np.broadcast_to(base, img.shape), np.broadcast_to(second, img.shape), _pattern(scene.pattern, rng, yy, xx))
    light_dir = rng.uniform(0, 2 * np.pi)
    shading = 1.0 + 0.25 * ((xx - cx) * np.cos(light_dir) + (yy - cy) * np.sin(light_dir)) / max(radius, 1.0)
    obj = obj * np.clip(shading, 0.6, 1.3)[..., None] * (1.0 + 0.06 * fractal_noise(rng, size, (6, 12)))[..., None]
    # A darker rim along the contour, like the shading at a real object's edge.
    rim = np.clip(1.3 - np.abs(sdf + 1.2), 0.0, 1.0)
    obj = obj * (1.0 - RIM_DARKENING * rim)[..., None]
    img = _mix(img, obj, alpha)

    visible = alpha > 0.5
    if scene.occluded:
        # A branch crossing near the object hides part of it.
        theta = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.6, 0.6) * radius
        dist = np.abs((xx - cx) * np.sin(theta) - (yy - cy) * np.cos(theta) - offset)
        branch = np.clip(rng.uniform(1.2, 2.3) * scale + 0.5 - dist, 0, 1)
        bark = _jitter((0.36, 0.25, 0.14), rng, 0.05) * (1.0 + 0.25 * value_noise(rng, size, 4, 16))[..., None]
        img = _mix(img, bark, branch)
        visible &= branch < 0.5

    # Global light: a brightness gradient and a colour cast over the whole frame, then sensor noise.
    grad_dir = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / size - 0.5) * np.cos(grad_dir) + (yy / size - 0.5) * np.sin(grad_dir)) * rng.uniform(0.0, 0.5)
    cast = 1.0 + rng.uniform(-0.07, 0.07) * np.array([1.0, 0.0, -1.0], np.float32)
    img = img * (rng.uniform(0.75, 1.15) * (1.0 + ramp))[..., None] * cast
    img = img + rng.uniform(0.01, 0.04) * rng.standard_normal(img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), visible
