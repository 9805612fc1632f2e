"""A small CNN that reads the demo scenes back: caption accuracy and FID-style features.

For each of the five positions it predicts whether an object is there and, if so,
its shape, colour and size. An image matches its caption when the objects it
finds are exactly the caption's objects, nothing missing and nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import COLOURS, POSITIONS, SHAPES, SIZES, Obj, Scene, parse

__all__ = ["WEIGHTS", "Evaluator", "Scores"]

WEIGHTS = Path(__file__).with_name("evaluator.safetensors")
_POSITIONS, _SHAPES, _COLOURS, _SIZES = list(POSITIONS), list(SHAPES), list(COLOURS), list(SIZES)
# Per position: presence logit, then shape, colour and size logits.
HEADS = (1, len(_SHAPES), len(_COLOURS), len(_SIZES))
INPUT_SIZE = 64  # images are read at this size: the attributes are coarse, and it keeps the evaluator cheap


@dataclass(frozen=True)
class Scores:
    """Caption accuracy of a set of images.

    ``overall`` is the fraction of images whose objects are exactly the caption's;
    ``shape``, ``colour``, ``size`` and ``position`` are fractions of caption objects
    with that attribute right (``position``: an object is found where the caption
    puts it); ``count`` is the fraction of images with as many objects as the caption.
    """

    overall: float
    shape: float
    colour: float
    size: float
    position: float
    count: float
    n: int


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
    )


class Evaluator(nn.Module):
    """Reads demo images. Call it (or :meth:`features`) for FID features, :meth:`accuracy` to score captions.

    As a module it maps images ``(N, 3, H, W)`` to ``(N, num_features)`` float
    features, so it can serve as ``FrechetInceptionDistance(feature=evaluator)``.
    Images are uint8 in [0, 255] or float in [0, 1], of any size (read at 64²).
    """

    num_features = 256

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 64), _block(64, 128), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128 * 4 * 4, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, len(_POSITIONS) * sum(HEADS))

    @classmethod
    def load(cls, path: str | Path = WEIGHTS, device: str | torch.device | None = None) -> Evaluator:
        """The shipped evaluator (or one saved at ``path``), in eval mode."""
        from safetensors.torch import load_file

        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False).to(device or "cpu")

    def _prepare(self, images) -> torch.Tensor:
        x = _as_tensor(images).to(self.head.weight.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def features(self, images) -> torch.Tensor:
        """``(N, num_features)`` features of the images."""
        return self.embed(self.body(self._prepare(images)))

    forward = features

    def logits(self, images) -> torch.Tensor:
        """``(N, positions, 1 + shapes + colours + sizes)``: per position, presence then attribute logits."""
        return self.head(self.features(images)).view(-1, len(_POSITIONS), sum(HEADS))

    @torch.no_grad()
    def read(self, images, batch_size: int = 256) -> list[tuple[dict[str, Obj], set[str]]]:
        """Per image: the most likely object at every position, and the positions that hold one."""
        out = []
        for start in range(0, len(images), batch_size):
            out += decode(self.logits(images[start : start + batch_size]))
        return out

    def predict(self, images) -> list[Scene]:
        """The scene found in each image (objects in position order)."""
        return [Scene(tuple(o for pos, o in best.items() if pos in where)) for best, where in self.read(images)]

    def accuracy(self, images, prompts: Sequence[Scene | str]) -> Scores:
        """How well ``images`` match ``prompts`` (scenes or caption strings), image by image."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return score(self.read(images), prompts)


def decode(logits: torch.Tensor) -> list[tuple[dict[str, Obj], set[str]]]:
    """Readings from ``(N, positions, 1 + shapes + colours + sizes)`` logits (see :meth:`Evaluator.read`)."""
    present, shape, colour, size = logits.detach().cpu().split(HEADS, dim=-1)
    shape, colour, size = shape.argmax(-1), colour.argmax(-1), size.argmax(-1)
    return [
        (
            {
                pos: Obj(_SHAPES[shape[i, p]], _COLOURS[colour[i, p]], _SIZES[size[i, p]], pos)
                for p, pos in enumerate(_POSITIONS)
            },
            {pos for p, pos in enumerate(_POSITIONS) if present[i, p, 0] > 0},
        )
        for i in range(present.shape[0])
    ]


def score(readings: list[tuple[dict[str, Obj], set[str]]], prompts: Sequence[Scene | str]) -> Scores:
    """How well readings (from :func:`decode`) match ``prompts`` (scenes or caption strings), one by one."""
    truth = [p if isinstance(p, Scene) else parse(p) for p in prompts]
    hits = {"shape": 0, "colour": 0, "size": 0, "position": 0}
    overall = count = objects = 0
    for want, (best, where) in zip(truth, readings, strict=True):
        overall += set(want.objects) == {best[pos] for pos in where}
        count += len(want.objects) == len(where)
        for o in want.objects:
            objects += 1
            g = best[o.position]
            hits["shape"] += g.shape == o.shape
            hits["colour"] += g.colour == o.colour
            hits["size"] += g.size == o.size
            hits["position"] += o.position in where
    n = max(len(truth), 1)
    return Scores(overall / n, *(hits[k] / max(objects, 1) for k in hits), count / n, len(truth))


def _as_tensor(images) -> torch.Tensor:
    """``(N, 3, H, W)`` tensor from a tensor, an ``(N, H, W, 3)`` array (uint8 or [0, 1]) or a list of PIL images."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2).copy())
