"""A procedural visible-infrared pedestrian dataset, written in the SYSU-MM01 original layout.

Every identity is a parametric person: body proportions (shoulder, waist and hip width, head size, leg length, limb
thickness), clothing (upper garment colours and pattern: plain, horizontal/vertical stripes, two-tone blocks, check or
a chest logo; sleeve length; trousers, shorts or skirt with an optional side stripe; shoes) and accessories (hair
style, cap or beanie, backpack, shoulder bag or hand bag). Each garment also carries an infrared brightness that is
only partly tied to its luminance (as with real near-infrared / thermal cameras, where dye colour does not predict
brightness), and the body has a heat pattern (skin, neck and chest warm; hair, shoes and bags cool).

Visible cameras 1, 2, 4, 5 render colour images, each with its own background scene, illumination level, white balance,
person scale and crop, over per-image pose jitter (front/back view, stride, arm swing, lean) and lighting jitter.
Infrared cameras 3, 6 render a thermal-like grayscale image of the same person (stored as three equal channels, like
SYSU-MM01's IR images): colour is gone; silhouette, accessories, pattern texture and body heat remain, under automatic
gain changes, blur and sensor noise (per-pixel and fixed-pattern column noise).

So a colour descriptor separates identities easily within the visible cameras but says almost nothing across
modalities, while shape, texture and layout are shared: a model has something real to learn (see the tests).

Determinism: each identity and each image draws from its own ``numpy`` generator seeded by ``(seed, pid[, camera,
index])`` and files are written with fixed JPEG settings, so one seed gives the same bytes on a given platform and
library versions (numpy's vectorised math and libjpeg may differ in the last bit across CPUs or releases).

CLI::

    python -m vireid_fast.data.synthetic --out data/synthetic --ids 220 --seed 0
    python -m vireid_fast.data.synthetic --preview docs/images/synthetic_grid.png
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

GENERATOR_VERSION = 1
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
ALL_CAMERAS = (1, 2, 3, 4, 5, 6)
JPEG_QUALITY = 92
# How much a garment's infrared brightness follows its visible luminance (the rest is a random material property).
IR_LUMINANCE_WEIGHT = 0.8


@dataclass(frozen=True)
class SizePreset:
    """ids: total identities (split into train/val/test); images per (id, camera) drawn uniformly in the ranges."""

    ids: int
    visible_per_camera: tuple[int, int]
    infrared_per_camera: tuple[int, int]


SIZES = {
    "tiny": SizePreset(ids=24, visible_per_camera=(2, 3), infrared_per_camera=(2, 3)),
    "small": SizePreset(ids=220, visible_per_camera=(2, 4), infrared_per_camera=(3, 5)),
    "medium": SizePreset(ids=491, visible_per_camera=(4, 8), infrared_per_camera=(5, 9)),
    "large": SizePreset(ids=1000, visible_per_camera=(8, 14), infrared_per_camera=(10, 16)),
}
DEFAULT_SIZE = "small"
DEFAULT_IMAGE_SIZE = (128, 64)  # (H, W)
TEST_FRACTION = 0.3
VAL_FRACTION = 0.15


@dataclass(frozen=True)
class Camera:
    """A camera's fixed character. Colours are RGB in [0, 1]."""

    camid: int
    infrared: bool
    indoor: bool
    wall: tuple[float, float, float]
    floor: tuple[float, float, float]
    props: tuple[tuple[float, float, float], ...]  # colours of background objects
    gain: float  # mean illumination (visible) or mean AGC gain (infrared)
    white_balance: tuple[float, float, float]
    scale: tuple[float, float]  # person height as a fraction of the image height
    blur: float  # gaussian sigma in pixels at 128 px height
    noise: float


CAMERAS = {
    1: Camera(1, False, True, (0.78, 0.70, 0.58), (0.45, 0.36, 0.28), ((0.55, 0.25, 0.2), (0.9, 0.88, 0.8),
              (0.3, 0.3, 0.35)), 1.0, (1.08, 1.0, 0.86), (0.82, 0.92), 0.5, 0.012),
    2: Camera(2, False, True, (0.62, 0.68, 0.74), (0.32, 0.34, 0.38), ((0.2, 0.3, 0.5), (0.85, 0.85, 0.9),
              (0.6, 0.62, 0.55)), 0.85, (0.92, 1.0, 1.1), (0.78, 0.9), 0.6, 0.018),
    4: Camera(4, False, False, (0.62, 0.72, 0.82), (0.38, 0.42, 0.30), ((0.25, 0.45, 0.22), (0.55, 0.5, 0.45),
              (0.75, 0.75, 0.72)), 1.15, (1.0, 1.0, 1.0), (0.84, 0.95), 0.4, 0.01),
    5: Camera(5, False, False, (0.52, 0.36, 0.30), (0.30, 0.30, 0.30), ((0.2, 0.2, 0.18), (0.65, 0.45, 0.35),
              (0.4, 0.5, 0.4)), 0.7, (1.02, 0.98, 0.95), (0.8, 0.93), 0.7, 0.02),
    3: Camera(3, True, True, (0.32, 0.32, 0.32), (0.26, 0.26, 0.26), ((0.55,) * 3, (0.15,) * 3, (0.4,) * 3),
              1.0, (1.0, 1.0, 1.0), (0.8, 0.92), 0.9, 0.03),
    6: Camera(6, True, False, (0.18, 0.18, 0.18), (0.24, 0.24, 0.24), ((0.1,) * 3, (0.45,) * 3, (0.3,) * 3),
              1.15, (1.0, 1.0, 1.0), (0.82, 0.95), 1.1, 0.045),
}

HAIR_STYLES = ("bald", "short", "long", "ponytail")
HATS = ("none", "cap", "beanie")
UPPER_PATTERNS = ("plain", "hstripes", "vstripes", "block_h", "block_v", "check", "logo")
LOGO_SHAPES = ("circle", "square", "diamond", "triangle")
LOWER_STYLES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder", "hand")


@dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic person recognisable. Lengths are fractions of the person's height."""

    pid: int
    shoulder: float
    waist: float
    hip: float
    head: float
    crotch: float
    limb: float
    skin: tuple[float, float, float]
    skin_heat: float
    hair_style: str
    hair: tuple[float, float, float]
    hair_ir: float
    hat: str
    hat_rgb: tuple[float, float, float]
    hat_ir: float
    upper_pattern: str
    upper1: tuple[float, float, float]
    upper2: tuple[float, float, float]
    upper1_ir: float
    upper2_ir: float
    stripe_freq: float
    block_split: float
    logo: str
    long_sleeves: bool
    lower_style: str
    lower: tuple[float, float, float]
    lower_ir: float
    side_stripe: bool
    shoes: tuple[float, float, float]
    shoes_ir: float
    bag: str
    bag_rgb: tuple[float, float, float]
    bag_ir: float
    bag_side: int
    chest_heat: float


def _luminance(rgb) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _garment_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    if rng.random() < 0.3:  # neutrals: black, white, greys, navy, beige
        neutrals = ((0.08, 0.08, 0.09), (0.92, 0.92, 0.9), (0.5, 0.5, 0.52), (0.25, 0.25, 0.27), (0.12, 0.15, 0.32),
                    (0.78, 0.7, 0.55))
        base = np.array(neutrals[rng.integers(len(neutrals))])
        return tuple(float(v) for v in np.clip(base + rng.normal(0, 0.03, 3), 0, 1))
    h = rng.random()
    s = rng.uniform(0.45, 0.95)
    v = rng.uniform(0.35, 0.95)
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))


def _ir_of(rng: np.random.Generator, rgb) -> float:
    # Partly tied to visible luminance, partly a material property unrelated to the dye colour.
    weight = IR_LUMINANCE_WEIGHT
    return float(np.clip(weight * _luminance(rgb) + (1 - weight) * rng.random(), 0.05, 0.95))


def make_identity(seed: int, pid: int) -> Identity:
    """The identity ``pid`` of dataset ``seed`` (independent of how many identities are generated)."""
    rng = np.random.default_rng([seed, pid, 0x1D])
    build = rng.uniform(0.0, 1.0)
    skin_tones = ((0.96, 0.80, 0.69), (0.87, 0.67, 0.52), (0.72, 0.52, 0.38), (0.50, 0.34, 0.24), (0.33, 0.22, 0.16))
    skin = np.array(skin_tones[rng.integers(len(skin_tones))]) + rng.normal(0, 0.02, 3)
    hair_colours = ((0.06, 0.05, 0.05), (0.25, 0.16, 0.1), (0.55, 0.4, 0.22), (0.85, 0.75, 0.5), (0.6, 0.6, 0.6),
                    (0.5, 0.15, 0.1))
    hair = np.array(hair_colours[rng.integers(len(hair_colours))]) + rng.normal(0, 0.02, 3)
    upper1 = _garment_colour(rng)
    upper2 = _garment_colour(rng)
    lower = _garment_colour(rng)
    hat_rgb = _garment_colour(rng)
    bag_rgb = _garment_colour(rng)
    shoes = _garment_colour(rng) if rng.random() < 0.4 else tuple(float(v) for v in rng.uniform(0.05, 0.25) *
                                                                   np.ones(3))
    return Identity(
        pid=pid,
        shoulder=float(0.095 + 0.045 * build + rng.normal(0, 0.006)),
        waist=float(0.07 + 0.045 * build + rng.normal(0, 0.006)),
        hip=float(0.075 + 0.04 * build + rng.normal(0, 0.006)),
        head=float(rng.uniform(0.85, 1.15)),
        crotch=float(rng.uniform(0.49, 0.56)),
        limb=float(0.026 + 0.014 * build + rng.normal(0, 0.002)),
        skin=tuple(float(v) for v in np.clip(skin, 0, 1)),
        skin_heat=float(rng.uniform(0.8, 0.95)),
        hair_style=HAIR_STYLES[rng.choice(4, p=(0.12, 0.45, 0.28, 0.15))],
        hair=tuple(float(v) for v in np.clip(hair, 0, 1)),
        hair_ir=float(rng.uniform(0.15, 0.45)),
        hat=HATS[rng.choice(3, p=(0.7, 0.18, 0.12))],
        hat_rgb=hat_rgb,
        hat_ir=_ir_of(rng, hat_rgb),
        upper_pattern=UPPER_PATTERNS[rng.choice(7, p=(0.28, 0.14, 0.1, 0.13, 0.09, 0.08, 0.18))],
        upper1=upper1,
        upper2=upper2,
        upper1_ir=_ir_of(rng, upper1),
        upper2_ir=_ir_of(rng, upper2),
        stripe_freq=float(rng.uniform(2.5, 6.0)),
        block_split=float(rng.uniform(0.35, 0.65)),
        logo=LOGO_SHAPES[rng.integers(4)],
        long_sleeves=bool(rng.random() < 0.55),
        lower_style=LOWER_STYLES[rng.choice(3, p=(0.68, 0.17, 0.15))],
        lower=lower,
        lower_ir=_ir_of(rng, lower),
        side_stripe=bool(rng.random() < 0.2),
        shoes=shoes,
        shoes_ir=float(rng.uniform(0.1, 0.35)),
        bag=BAGS[rng.choice(4, p=(0.4, 0.25, 0.2, 0.15))],
        bag_rgb=bag_rgb,
        bag_ir=float(rng.uniform(0.05, 0.4)),
        bag_side=int(rng.choice((-1, 1))),
        chest_heat=float(rng.uniform(0.1, 0.35)),
    )


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    Y.flags.writeable = False
    X.flags.writeable = False
    return Y, X


class _Canvas:
    """Alpha-composites shapes into one layer: RGB (H, W, 3) for a visible camera, IR (H, W) for an infrared one.

    Shapes are evaluated only inside their bounding window (``win``, a pair of slices) and embedded in full-frame
    arrays, so shapes can be combined freely while painting touches only the window.
    """

    def __init__(self, layer: np.ndarray, infrared: bool):
        self.layer = layer
        self.infrared = infrared
        self.h, self.w = layer.shape[:2]
        self.Y, self.X = _pixel_grid(self.h, self.w)

    def window(self, x0, y0, x1, y1) -> tuple[slice, slice]:
        def span(lo, hi, n):
            start = min(max(int(np.floor(lo)) - 1, 0), n)
            return slice(start, max(min(int(np.ceil(hi)) + 2, n), start))

        return span(min(y0, y1), max(y0, y1), self.h), span(min(x0, x1), max(x0, x1), self.w)

    def full(self, win, values: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((self.h, self.w), fill, np.float32)
        out[win] = values
        return out

    def paint(self, alpha: np.ndarray, rgb, ir, shade: np.ndarray | float | None = None,
              win: tuple[slice, slice] = (slice(None), slice(None))) -> None:
        """alpha (H, W) in [0, 1]; rgb (3,) or (H, W, 3); ir scalar or (H, W); shade scalar or (H, W) multiplies
        both (infrared less: emission depends less on the surface angle). Only ``win`` is touched."""
        a = alpha[win]
        if shade is not None and np.ndim(shade) == 2:
            shade = shade[win]
        if self.infrared:
            value = np.asarray(ir, np.float32)
            value = value[win] if value.ndim == 2 else value
            if shade is not None:
                value = value * (0.75 + 0.25 * shade)
            target = self.layer[win]
            target += a * (value - target)
        else:
            value = np.asarray(rgb, np.float32)
            value = value[win] if value.ndim == 3 else value
            if shade is not None:
                value = value * (shade[..., None] if np.ndim(shade) == 2 else shade)
            target = self.layer[win]
            target += a[..., None] * (value - target)

    def capsule(self, x0, y0, x1, y1, r):
        """(alpha, normalised distance to the axis, window) of a rounded segment of radius r (pixels)."""
        win = self.window(min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
        X, Y = self.X[win], self.Y[win]
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
        d = np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy))
        return (self.full(win, np.clip(r - d + 0.5, 0.0, 1.0), 0.0),
                self.full(win, np.minimum(d / max(r, 1e-3), 1.0), 1.0), win)

    def ellipse(self, cx, cy, rx, ry):
        win = self.window(cx - rx, cy - ry, cx + rx, cy + ry)
        d = np.hypot((self.X[win] - cx) / rx, (self.Y[win] - cy) / ry)
        return (self.full(win, np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0), 0.0),
                self.full(win, np.minimum(d, 1.0), 1.0), win)

    def box(self, x0, y0, x1, y1):
        win = self.window(x0, y0, x1, y1)
        ax = np.clip(np.minimum(self.X[win] - x0, x1 - self.X[win]) + 0.5, 0.0, 1.0)
        ay = np.clip(np.minimum(self.Y[win] - y0, y1 - self.Y[win]) + 0.5, 0.0, 1.0)
        return self.full(win, ax * ay, 0.0), win


def _union(a: tuple[slice, slice], b: tuple[slice, slice]) -> tuple[slice, slice]:
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b, strict=True))


def _background(cam: Camera, rng: np.random.Generator, h: int, w: int) -> _Canvas:
    """A canvas holding the scene behind the person: RGB for a visible camera, IR for an infrared one."""
    y = (np.arange(h, dtype=np.float32) + 0.5)[:, None] / h
    horizon = rng.uniform(0.62, 0.8)
    wall = np.array(cam.wall, np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    floor = np.array(cam.floor, np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    t = np.clip((y - horizon) * 12.0 + 0.5, 0.0, 1.0)[..., None]  # soft floor line
    column = (wall * (1 - t) + floor * t) * (1.0 - 0.25 * y)[..., None]  # (H, 1, 3)
    if cam.infrared:
        layer = np.broadcast_to(column.mean(axis=2), (h, w)).astype(np.float32)
    else:
        layer = np.broadcast_to(column, (h, w, 3)).astype(np.float32)
    canvas = _Canvas(layer, cam.infrared)
    for _ in range(int(rng.integers(2, 5))):  # doors, windows, posters, trees, radiators
        colour = np.array(cam.props[int(rng.integers(len(cam.props)))], np.float32) * rng.uniform(0.85, 1.15)
        x0 = rng.uniform(-0.2, 0.9) * w
        y0 = rng.uniform(-0.1, 0.6) * h
        bw, bh = rng.uniform(0.15, 0.6) * w, rng.uniform(0.1, 0.5) * h
        alpha, win = canvas.box(x0, y0, x0 + bw, y0 + bh)
        canvas.paint(alpha, colour, colour.mean(), win=win)
    texture = gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 2.0) * 0.12
    canvas.layer += texture if cam.infrared else texture[..., None]
    return canvas


def _render_person(c: _Canvas, ident: Identity, rng: np.random.Generator, cam: Camera, h: int, w: int) -> None:
    scale = rng.uniform(*cam.scale)
    hp = scale * h  # person height in pixels
    top = rng.uniform(0.02, 1.0 - scale - 0.01) * h
    cx = w * 0.5 + rng.uniform(-0.07, 0.07) * w
    lean = rng.normal(0, 0.03)
    back = bool(rng.random() < 0.5)
    stride = rng.uniform(-0.06, 0.06)
    swing = rng.uniform(-0.05, 0.05)

    def P(u, v):  # body coordinates (u down from the head top, v right, both in person heights) -> pixels
        return cx + (v + lean * (u - 0.5)) * hp, top + u * hp

    def limb_shade(d):
        return 1.0 - 0.35 * d * d

    skin = np.array(ident.skin, np.float32)
    head_r = 0.06 * ident.head
    neck_u = 2 * head_r + 0.01
    shoulder_u = neck_u + 0.035
    waist_u = ident.crotch - 0.07
    limb = ident.limb * hp

    # Backpack body behind the person (seen from the back it is drawn later, over the torso).
    if ident.bag == "backpack" and not back:
        x0, y0 = P(shoulder_u + 0.02, -ident.shoulder * 0.95)
        x1, y1 = P(waist_u - 0.04, ident.shoulder * 0.95)
        a, win = c.box(x0 - 2, y0, x1 + 2, y1)
        c.paint(a, ident.bag_rgb, ident.bag_ir, win=win)

    # Legs and shoes.
    hip_x = ident.hip * 0.55
    for side in (-1, 1):
        foot_v = side * (hip_x + 0.005) + (stride if side > 0 else -stride) * 0.5 + stride * 0.5
        x0, y0 = P(ident.crotch - 0.04, side * hip_x)
        x1, y1 = P(0.955, foot_v)
        a, d, win = c.capsule(x0, y0, x1, y1, limb * 1.15)
        if ident.lower_style == "trousers":
            c.paint(a, ident.lower, ident.lower_ir + 0.05 * ident.skin_heat, limb_shade(d), win)
            if ident.side_stripe:
                off = side * limb * 0.7
                a3, _, _ = c.capsule(x0 + off, y0, x1 + off, y1 - limb, max(limb * 0.3, 0.6))
                c.paint(a3 * a, ident.upper2, ident.upper2_ir, win=win)
        else:
            c.paint(a, skin, ident.skin_heat * 0.95, limb_shade(d), win)
            if ident.lower_style == "shorts":
                xm, ym = P(ident.crotch + 0.13, side * hip_x + (foot_v - side * hip_x) * 0.35)
                a2, d2, win2 = c.capsule(x0, y0, xm, ym, limb * 1.25)
                c.paint(a2, ident.lower, ident.lower_ir, limb_shade(d2), win2)
        sx, sy = P(0.975, foot_v + side * 0.01)
        a4, d4, win4 = c.ellipse(sx, sy, limb * 1.6, max(0.025 * hp, 1.2))
        c.paint(a4, ident.shoes, ident.shoes_ir, 1.0 - 0.3 * d4 * d4, win4)

    def trapezoid(u0, u1, half0, half1, pad_top=0.0):
        """A lean-following trapezoid between heights u0 and u1: (alpha, tx in [-1, 1], ty in [0, 1], window)."""
        ys, ye = top + u0 * hp, top + u1 * hp
        reach = (max(half0, half1) + abs(lean)) * hp + 2
        win = c.window(cx - reach, ys - pad_top * hp, cx + reach, ye)
        X, Y = c.X[win], c.Y[win]
        ty = np.clip((Y - ys) / (ye - ys), 0.0, 1.0)
        half = (half0 + (half1 - half0) * ty) * hp
        xc = cx + lean * ((Y - top) / hp - 0.5) * hp
        tx = (X - xc) / np.maximum(half, 1.0)
        inside = np.clip(half - np.abs(X - xc) + 0.5, 0, 1) * np.clip(np.minimum(Y - ys + pad_top * hp, ye - Y) + 0.5,
                                                                      0, 1)
        return c.full(win, inside, 0.0), c.full(win, tx, 0.0), c.full(win, ty, 0.0), win

    # Skirt, or the hips of trousers/shorts.
    if ident.lower_style == "skirt":
        a, tx, _, win = trapezoid(waist_u, ident.crotch + 0.14, ident.waist, ident.hip * 1.35)
        c.paint(a, ident.lower, ident.lower_ir, 1.0 - 0.3 * np.minimum(np.abs(tx), 1) ** 2, win)
    else:
        x0, y0 = P(waist_u, -ident.hip)
        x1, y1 = P(ident.crotch + 0.015, ident.hip)
        a, win = c.box(x0, y0, x1, y1)
        c.paint(a, ident.lower, ident.lower_ir, win=win)

    # Torso with the upper garment's pattern and a body-heat blob.
    torso, tx, ty, torso_win = trapezoid(shoulder_u, waist_u + 0.02, ident.shoulder, ident.waist, pad_top=0.02)
    if back:
        tx = -tx
    pattern = ident.upper_pattern
    f = ident.stripe_freq
    if pattern == "hstripes":
        second = np.sin(2 * np.pi * f * ty) > 0
    elif pattern == "vstripes":
        second = np.sin(np.pi * f * (tx + 1.0)) > 0
    elif pattern == "block_h":
        second = ty > ident.block_split
    elif pattern == "block_v":
        second = tx > 0
    elif pattern == "check":
        second = (np.sin(2 * np.pi * f * ty) > 0) ^ (np.sin(np.pi * f * (tx + 1.0)) > 0)
    elif pattern == "logo" and not back:
        lx, ly = tx / 0.45, (ty - 0.38) / 0.22
        if ident.logo == "circle":
            second = lx * lx + ly * ly < 1.0
        elif ident.logo == "square":
            second = (np.abs(lx) < 0.85) & (np.abs(ly) < 0.85)
        elif ident.logo == "diamond":
            second = np.abs(lx) + np.abs(ly) < 1.0
        else:
            second = (ly < 0.8) & (np.abs(lx) < (ly + 1.0) * 0.5)
    else:
        second = np.zeros_like(ty, dtype=bool)
    torso_shade = 1.0 - 0.3 * np.minimum(np.abs(tx), 1.0) ** 2
    if c.infrared:
        heat = np.exp(-(tx * tx / 0.5 + (ty - 0.3) ** 2 / 0.15)).astype(np.float32) * ident.chest_heat
        ir = np.where(second, ident.upper2_ir, ident.upper1_ir).astype(np.float32) + heat
        c.paint(torso, None, ir, torso_shade, torso_win)
    else:
        colour = np.where(second[..., None], np.array(ident.upper2, np.float32), np.array(ident.upper1, np.float32))
        c.paint(torso, colour, None, torso_shade, torso_win)

    # Neck, arms, hands.
    nx0, ny0 = P(neck_u - 0.02, 0)
    nx1, ny1 = P(shoulder_u + 0.01, 0)
    a, _, win = c.capsule(nx0, ny0, nx1, ny1, 0.022 * hp)
    c.paint(a, skin, ident.skin_heat, win=win)
    for side in (-1, 1):
        sw = side * swing
        sx, sy = P(shoulder_u + 0.015, side * (ident.shoulder - 0.01))
        ex, ey = P(shoulder_u + 0.16, side * (ident.shoulder + 0.012) + sw * 0.5)
        hx, hy = P(shoulder_u + 0.31, side * (ident.shoulder + 0.01) + sw)
        a1, d1, win1 = c.capsule(sx, sy, ex, ey, limb)
        a2, d2, win2 = c.capsule(ex, ey, hx, hy, limb * 0.9)
        c.paint(a1, ident.upper1, ident.upper1_ir + 0.05, limb_shade(d1), win1)
        if ident.long_sleeves:
            c.paint(a2, ident.upper1, ident.upper1_ir + 0.05, limb_shade(d2), win2)
        else:
            c.paint(a2, skin, ident.skin_heat * 0.95, limb_shade(d2), win2)
        a3, _, win3 = c.ellipse(hx, hy + limb * 0.6, limb * 0.95, limb * 1.1)
        c.paint(a3, skin, ident.skin_heat, win=win3)

    # Accessories over the torso.
    if ident.bag == "backpack":
        if back:
            x0, y0 = P(shoulder_u + 0.02, -ident.shoulder * 0.85)
            x1, y1 = P(waist_u - 0.02, ident.shoulder * 0.85)
            a, win = c.box(x0, y0, x1, y1)
            c.paint(a, ident.bag_rgb, ident.bag_ir, 0.85 + 0.15 * torso, win)
        else:
            for side in (-1, 1):
                x0, y0 = P(shoulder_u, side * ident.shoulder * 0.55)
                x1, y1 = P(waist_u - 0.05, side * ident.shoulder * 0.6)
                a, _, win = c.capsule(x0, y0, x1, y1, max(0.012 * hp, 0.7))
                c.paint(a, ident.bag_rgb, ident.bag_ir, win=win)
    elif ident.bag == "shoulder":
        side = ident.bag_side * (-1 if back else 1)
        x0, y0 = P(shoulder_u, -side * ident.shoulder * 0.7)
        x1, y1 = P(waist_u + 0.02, side * (ident.hip + 0.03))
        a, _, win = c.capsule(x0, y0, x1, y1, max(0.01 * hp, 0.6))
        c.paint(a, ident.bag_rgb, ident.bag_ir, win=win)
        bx0, by0 = P(waist_u - 0.03, side * (ident.hip + 0.005) - 0.045)
        a, win = c.box(bx0, by0, bx0 + 0.09 * hp, by0 + 0.1 * hp)
        c.paint(a, ident.bag_rgb, ident.bag_ir, win=win)
    elif ident.bag == "hand":
        side = ident.bag_side * (-1 if back else 1)
        hx, hy = P(shoulder_u + 0.33, side * (ident.shoulder + 0.01) + side * swing)
        a, win = c.box(hx - 0.04 * hp, hy, hx + 0.04 * hp, hy + 0.1 * hp)
        c.paint(a, ident.bag_rgb, ident.bag_ir, win=win)

    # Head, hair, hat.
    hx, hy = P(head_r + 0.005, 0)
    rx, ry = 0.8 * head_r * hp, head_r * hp
    hair = np.array(ident.hair, np.float32)
    long_hair, long_win = c.box(hx - rx * 1.05, hy - ry * 0.3, hx + rx * 1.05, hy + ry * 1.9)
    if ident.hair_style == "long" and not back:  # falls behind the head and shoulders
        c.paint(long_hair, hair, ident.hair_ir, win=long_win)
    head_a, head_d, head_win = c.ellipse(hx, hy, rx, ry)
    c.paint(head_a, skin, ident.skin_heat + 0.05, 1.0 - 0.25 * head_d * head_d, head_win)
    if ident.hair_style != "bald":
        if back:  # the back of the head is all hair
            c.paint(head_a, hair, ident.hair_ir, win=head_win)
        else:
            cap = head_a * np.clip((hy - ry * 0.25 - c.Y) + 0.5, 0, 1)
            c.paint(cap, hair, ident.hair_ir, win=head_win)
        if ident.hair_style == "long" and back:
            c.paint(long_hair, hair, ident.hair_ir, win=long_win)
        elif ident.hair_style == "ponytail" and back:
            px, py = P(head_r * 1.9, 0.0)
            a, _, win = c.capsule(hx, hy, px, py + 0.05 * hp, 0.025 * hp)
            c.paint(a, hair, ident.hair_ir, win=win)
    if ident.hat != "none":
        hat = np.array(ident.hat_rgb, np.float32)
        if ident.hat == "beanie":
            crown, _, crown_win = c.ellipse(hx, hy - ry * 0.45, rx * 1.05, ry * 0.7)
            a = np.maximum(head_a * np.clip((hy - ry * 0.1 - c.Y) + 0.5, 0, 1), crown)
            c.paint(a, hat, ident.hat_ir, win=_union(head_win, crown_win))
        else:
            c.paint(head_a * np.clip((hy - ry * 0.35 - c.Y) + 0.5, 0, 1), hat, ident.hat_ir, win=head_win)
            a, win = c.box(hx - rx * 1.1, hy - ry * 0.45, hx + rx * 1.1, hy - ry * 0.3)
            c.paint(a, hat * 0.85, ident.hat_ir, win=win)


def render(ident: Identity, camid: int, rng: np.random.Generator, size: tuple[int, int] = DEFAULT_IMAGE_SIZE
           ) -> np.ndarray:
    """One image of ``ident`` seen by camera ``camid``: (H, W, 3) uint8 (infrared cameras: three equal channels)."""
    h, w = size
    cam = CAMERAS[camid]
    canvas = _background(cam, rng, h, w)
    _render_person(canvas, ident, rng, cam, h, w)
    px = h / 128.0  # blur scales with resolution
    if cam.infrared:
        ir = gaussian_filter(canvas.layer, cam.blur * px * rng.uniform(0.8, 1.25))
        gain = cam.gain * rng.uniform(0.8, 1.2)
        ir = (ir - 0.3) * gain + 0.3 + rng.uniform(-0.08, 0.08)
        column = np.random.default_rng([camid, 0xC01]).normal(0, 0.012, w).astype(np.float32)  # fixed pattern
        ir = ir + column[None, :] + rng.normal(0, cam.noise, (h, w)).astype(np.float32)
        ir = np.clip(ir, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
        gray = np.round(ir * 255.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    illumination = cam.gain * rng.uniform(0.8, 1.2)
    tint = np.array(cam.white_balance, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    ramp = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    rgb = canvas.layer * (illumination * tint) * ramp
    rgb = gaussian_filter(rgb, (cam.blur * px, cam.blur * px, 0))
    rgb = rgb + rng.normal(0, cam.noise, rgb.shape).astype(np.float32)
    rgb = np.clip(rgb, 0.0, 1.0) ** (1.0 / 1.1)
    return np.round(rgb * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticSplit:
    train_ids: list[int]
    val_ids: list[int]
    test_ids: list[int]


def split_ids(num_ids: int, seed: int) -> SyntheticSplit:
    """Identities 1..num_ids split into train/val/test (about 55/15/30 %, like SYSU-MM01's 296/99/96)."""
    if num_ids < 3:
        raise ValueError(f"ids must be at least 3 (one per split), got {num_ids}")
    order = np.random.default_rng([seed, 0x5B17]).permutation(np.arange(1, num_ids + 1))
    n_test = max(1, round(num_ids * TEST_FRACTION))
    n_val = max(1, round(num_ids * VAL_FRACTION))
    test = sorted(int(i) for i in order[:n_test])
    val = sorted(int(i) for i in order[n_test:n_test + n_val])
    train = sorted(int(i) for i in order[n_test + n_val:])
    return SyntheticSplit(train, val, test)


def camera_plan(seed: int, pid: int, preset: SizePreset) -> dict[int, int]:
    """How many images identity ``pid`` has in each camera. Like SYSU-MM01, some (id, camera) pairs are missing:
    with probability 0.2 one visible camera and with probability 0.15 one infrared camera (never both IR)."""
    rng = np.random.default_rng([seed, pid, 0xCA])
    plan = {}
    for cam in ALL_CAMERAS:
        lo, hi = preset.infrared_per_camera if cam in INFRARED_CAMERAS else preset.visible_per_camera
        plan[cam] = int(rng.integers(lo, hi + 1))
    if rng.random() < 0.2:
        plan[int(rng.choice(VISIBLE_CAMERAS))] = 0
    if rng.random() < 0.15:
        plan[int(rng.choice(INFRARED_CAMERAS))] = 0
    return plan


def _write_jpeg(array: np.ndarray, path: str) -> None:
    Image.fromarray(array, "RGB").save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False,
                                       progressive=False, subsampling=0)


def _render_identity(args) -> int:
    out_dir, seed, pid, preset, image_size = args
    ident = make_identity(seed, pid)
    written = 0
    for cam, count in camera_plan(seed, pid, preset).items():
        if count == 0:
            continue
        folder = os.path.join(out_dir, f"cam{cam}", f"{pid:04d}")
        os.makedirs(folder, exist_ok=True)
        for index in range(1, count + 1):
            rng = np.random.default_rng([seed, pid, cam, index])
            _write_jpeg(render(ident, cam, rng, image_size), os.path.join(folder, f"{index:04d}.jpg"))
            written += 1
    return written


def generate(out_dir: str, ids: int | None = None, seed: int = 0, size: str = DEFAULT_SIZE,
             image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, workers: int = 0, overwrite: bool = False) -> dict:
    """Write the synthetic dataset to ``out_dir`` in the SYSU-MM01 original layout and return its summary.

    ids: total identities (default: the size preset's; ~55 % train, 15 % val, 30 % test); seed: everything follows
    from it; size: ``"tiny" | "small" | "medium" | "large"`` (identities and images per camera); image_size: (H, W)
    of the stored JPEGs; workers: processes to render with (0 = up to 4, as many as CPUs; the bytes do not depend on
    it); overwrite: replace a dataset already in ``out_dir`` (its cam*/, exp/ and synthetic.json are removed first).
    The summary is also written to ``out_dir/synthetic.json``.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    preset = SIZES[size]
    num_ids = preset.ids if ids is None else int(ids)
    h, w = int(image_size[0]), int(image_size[1])
    if h < 32 or w < 16:
        raise ValueError(f"image_size must be at least (32, 16) (H, W); got {image_size}")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) or another path")
    split = split_ids(num_ids, seed)
    if overwrite and os.path.isdir(out_dir):
        import shutil

        for name in [f"cam{c}" for c in ALL_CAMERAS] + ["exp"]:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        if os.path.exists(os.path.join(out_dir, "synthetic.json")):
            os.remove(os.path.join(out_dir, "synthetic.json"))
    start = time.perf_counter()
    os.makedirs(os.path.join(out_dir, "exp"), exist_ok=True)
    for cam in ALL_CAMERAS:
        os.makedirs(os.path.join(out_dir, f"cam{cam}"), exist_ok=True)
    for name, id_list in (("train_id.txt", split.train_ids), ("val_id.txt", split.val_ids),
                          ("test_id.txt", split.test_ids)):
        with open(os.path.join(out_dir, "exp", name), "w") as f:
            f.write(",".join(str(i) for i in id_list) + "\n")
    jobs = [(out_dir, seed, pid, preset, (h, w)) for pid in range(1, num_ids + 1)]
    if workers <= 0:
        workers = min(4, os.cpu_count() or 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            images = sum(pool.map(_render_identity, jobs, chunksize=8))
    else:
        images = sum(_render_identity(job) for job in jobs)
    elapsed = time.perf_counter() - start
    num_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    summary = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "ids": num_ids, "image_size": [h, w],
        "train_ids": len(split.train_ids), "val_ids": len(split.val_ids), "test_ids": len(split.test_ids),
        "images": images, "bytes": num_bytes, "seconds": round(elapsed, 2),
    }
    with open(os.path.join(out_dir, "synthetic.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "seconds"}, f, indent=1, sort_keys=True)
    return summary


def preview_grid(path: str, identities: int = 6, seed: int = 0, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                 first_pid: int = 1) -> str:
    """Save a PNG grid: one row per identity, columns = cameras 1, 2, 4, 5 (visible) then 3, 6 (infrared)."""
    h, w = image_size
    gap = 4
    cams = VISIBLE_CAMERAS + INFRARED_CAMERAS
    grid = np.full((identities * (h + gap) + gap, len(cams) * (w + gap) + gap * 3, 3), 255, np.uint8)
    for row in range(identities):
        pid = first_pid + row
        ident = make_identity(seed, pid)
        for col, cam in enumerate(cams):
            image = render(ident, cam, np.random.default_rng([seed, pid, cam, 1]), image_size)
            x = gap + col * (w + gap) + (2 * gap if cam in INFRARED_CAMERAS else 0)
            y = gap + row * (h + gap)
            grid[y:y + h, x:x + w] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid, "RGB").save(path, format="PNG", optimize=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vireid_fast.data.synthetic",
        description="Write the procedural visible-infrared pedestrian dataset in the SYSU-MM01 original layout.")
    parser.add_argument("--out", help="output folder (SYSU-MM01 layout: cam1..cam6, exp/)")
    parser.add_argument("--ids", type=int, default=None, help="total identities (default: from --size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default=DEFAULT_SIZE,
                        help="identities and images per camera: " + "; ".join(
                            f"{k}: {v.ids} ids, {v.visible_per_camera[0]}-{v.visible_per_camera[1]} visible / "
                            f"{v.infrared_per_camera[0]}-{v.infrared_per_camera[1]} IR per camera"
                            for k, v in SIZES.items()))
    parser.add_argument("--height", type=int, default=DEFAULT_IMAGE_SIZE[0])
    parser.add_argument("--width", type=int, default=DEFAULT_IMAGE_SIZE[1])
    parser.add_argument("--workers", type=int, default=0,
                        help="processes (0: up to 4, one per CPU); the output bytes do not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out folder")
    parser.add_argument("--preview", metavar="PNG", help="write a grid of a few identities in all cameras instead")
    args = parser.parse_args(argv)
    if args.preview:
        print(preview_grid(args.preview, seed=args.seed, image_size=(args.height, args.width)))
        return 0
    if not args.out:
        parser.error("--out is required (or --preview PNG)")
    summary = generate(args.out, ids=args.ids, seed=args.seed, size=args.size, image_size=(args.height, args.width),
                       workers=args.workers, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

