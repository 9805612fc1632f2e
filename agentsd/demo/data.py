"""Procedural scenes with captions where position matters: the demo model's whole world.

Each scene holds one or two objects, each a shape of a colour and size at a position,
on a plain or two-tone grey background. Captions are made from the attributes and
parse back to them, so a caption *is* its attributes.

Held-out rule: every draw comes from a seed stream keyed by ``(split, seed)``;
the training recipe only draws from ``split="train"``, and :func:`prompts` and
tests only from ``split="test"``. Held-out therefore means unseen draws (new
jitter, backgrounds and attribute mixes), not unseen attribute combinations:
there are only 240 single-object captions, and training sees all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Batch",
    "Obj",
    "Scene",
    "parse",
    "prompts",
    "render",
    "sample",
    "scenes",
    "vocabulary",
]

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (225, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (155, 60, 205),
    "white": (245, 245, 245),
}
# Geometry is in units of 1/64 of the image side, so the world looks the same at any IMAGE_SIZE.
SIZES = {"small": 6.5, "large": 11.5}  # radius
POSITIONS = {  # centre (x, y), and the words that place it
    "left": ((16, 32), "on the left"),
    "right": ((48, 32), "on the right"),
    "top": ((32, 16), "at the top"),
    "bottom": ((32, 48), "at the bottom"),
    "centre": ((32, 32), "in the centre"),
}
# Two objects sit opposite each other, so even two large ones never overlap.
_PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
_SPLITS = {"train": 0, "test": 1}
_JITTER = 3  # max shift of an object's centre
_SUPERSAMPLE = 4  # anti-aliasing factor


@dataclass(frozen=True)
class Obj:
    """One object: its shape, colour, size and position, each a key of the tables above."""

    shape: str
    colour: str
    size: str
    position: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][1]}"


@dataclass(frozen=True)
class Scene:
    """The attributes a caption states: one or two objects, in caption order."""

    objects: tuple[Obj, ...]

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects)


class Batch(NamedTuple):
    """Images as uint8 ``(N, 3, IMAGE_SIZE, IMAGE_SIZE)``, with each image's caption and scene."""

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene]


def vocabulary() -> list[str]:
    """Every word a caption can use, in a fixed order (the tokenizer's vocabulary)."""
    words = ["a", "and", *SIZES, *COLOURS, *SHAPES]
    for _, phrase in POSITIONS.values():
        words += [w for w in phrase.split() if w not in words]
    return words


_PHRASE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(p for _, p in POSITIONS.values())})"
)
_POSITION_OF = {phrase: name for name, (_, phrase) in POSITIONS.items()}


def parse(caption: str) -> Scene:
    """The scene a caption states; raises ``ValueError`` for text outside the caption grammar."""
    parts = caption.strip().lower().split(" and ")
    objects = []
    for part in parts:
        m = _PHRASE.fullmatch(part)
        if m is None:
            raise ValueError(f"not a demo caption: {caption!r}")
        size, colour, shape, where = m.groups()
        objects.append(Obj(shape, colour, size, _POSITION_OF[where]))
    return Scene(tuple(objects))


def _rng(seed: int, split: str) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    return np.random.default_rng([_SPLITS[split], seed])


def _draw_scene(rng: np.random.Generator, num_objects: int) -> Scene:
    positions = (rng.choice(list(POSITIONS)),) if num_objects == 1 else _PAIRS[rng.integers(len(_PAIRS))]
    return Scene(
        tuple(
            Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))), str(p))
            for p in positions
        )
    )


def _counts(rng: np.random.Generator, n: int, num_objects: int | None) -> list[int]:
    if num_objects is None:
        return list(rng.integers(1, 3, size=n))
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1, 2 or None, got {num_objects}")
    return [num_objects] * n


def scenes(n: int, seed: int = 0, num_objects: int | None = 1, split: str = "test") -> list[Scene]:
    """``n`` scenes drawn from the ``(split, seed)`` stream; ``num_objects=None`` mixes one and two."""
    rng = _rng(seed, split)
    return [_draw_scene(rng, k) for k in _counts(rng, n, num_objects)]


def prompts(n: int, seed: int = 0, num_objects: int | None = 1) -> list[Scene]:
    """``n`` held-out scenes (``split="test"``); ``scene.caption`` is the prompt."""
    return scenes(n, seed, num_objects, split="test")


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    # Sizes are tuned so each shape covers a similar area at the same radius.
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # pointing up, apex at -r, base at +0.8r
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``scene`` as uint8 ``(3, size, size)``; ``rng`` supplies the background, jitter and tints (the same draws
    at every size, so one seed gives one scene at any resolution)."""
    s, unit = size, size / 64  # pixels, pixels per geometry unit
    canvas = np.empty((s, s, 3), np.float32)
    tones = rng.uniform(25, 115, size=2)
    canvas[:] = tones[0]
    split = rng.integers(3)  # 0 plain, 1 top/bottom halves, 2 left/right halves
    if split == 1:
        canvas[s // 2 :] = tones[1]
    elif split == 2:
        canvas[:, s // 2 :] = tones[1]
    for obj in scene.objects:
        (cx, cy), _ = POSITIONS[obj.position]
        cx, cy = (np.array([cx, cy]) + rng.uniform(-_JITTER, _JITTER, size=2)) * unit
        r = SIZES[obj.size] * rng.uniform(0.92, 1.08) * unit
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.uniform(-12, 12, size=3), 0, 255)
        # Anti-aliased coverage, supersampled over the object's bounding box only (keeps rendering cheap).
        half = 1.25 * r + 1
        x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 1, s)
        y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 1, s)
        xs = (np.arange(x0 * _SUPERSAMPLE, x1 * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - cx
        ys = (np.arange(y0 * _SUPERSAMPLE, y1 * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - cy
        m = _mask(obj.shape, xs[None, :], ys[:, None], r)
        alpha = m.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean((1, 3), dtype=np.float32)[..., None]
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    return np.round(canvas).astype(np.uint8).transpose(2, 0, 1)


def sample(n: int, seed: int = 0, num_objects: int | None = 1, split: str = "train", size: int = IMAGE_SIZE) -> Batch:
    """``n`` images of ``size``² with captions and scenes from the ``(split, seed)`` stream (same seed, same batch)."""
    rng = _rng(seed, split)
    drawn = [_draw_scene(rng, k) for k in _counts(rng, n, num_objects)]
    images = np.stack([render(sc, rng, size) for sc in drawn]) if drawn else np.zeros((0, 3, size, size), np.uint8)
    return Batch(torch.from_numpy(images), [sc.caption for sc in drawn], drawn)
