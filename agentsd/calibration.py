"""The calibration cache: from how many tokens the lean path pays, per device, dtype and eager or compiled.

``agentsd calibrate`` (:mod:`agentsd.bench.calibrate`) measures it and writes it here, to
``$XDG_CACHE_HOME/agentsd/calibration.json`` (``~/.cache``); :func:`load` (run by ``agentsd.apply``) puts what it
holds for this machine's devices where ``Phase(min_tokens=None)`` looks first. Reading only: the core imports this
module, never the measuring code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import schedule

__all__ = ["cache_path", "device_name", "key", "load", "save"]


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentsd" / "calibration.json"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def key(device: torch.device, dtype: torch.dtype, compiled: bool) -> str:
    """The cache key of a measurement: ``"<card> | <dtype> | eager"`` (or ``compiled``)."""
    return f"{device_name(device)} | {str(dtype).removeprefix('torch.')} | {'compiled' if compiled else 'eager'}"


def save(result: dict) -> None:
    """Add a measurement (``result["key"]``, ``result["min_tokens"]``, ...) to the cache and load the cache."""
    path = cache_path()
    cached = json.loads(path.read_text()) if path.is_file() else {}
    cached[result["key"]] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=1) + "\n")
    load()


def load() -> dict[tuple[str, str, str], int]:
    """Read the cache into ``schedule.CALIBRATED_MIN_TOKENS`` for the devices of this machine; returns it."""
    path = cache_path()
    found = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        names = {"cpu": "cpu"}
        if torch.cuda.is_available():
            names["cuda"] = device_name(torch.device("cuda"))
        for device_type, name in names.items():
            for entry in cached.values():
                card, dtype, mode = (part.strip() for part in entry["key"].split("|"))
                if card == name:
                    found[(device_type, dtype, mode)] = int(entry["min_tokens"])
    schedule.CALIBRATED_MIN_TOKENS.clear()
    schedule.CALIBRATED_MIN_TOKENS.update(found)
    return found
