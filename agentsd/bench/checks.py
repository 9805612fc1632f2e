"""The GPU suite's checks: no host sync in a patched forward, and torch.compile in every mode.

- ``no_sync``: a patched pipeline runs with ``torch.cuda.set_sync_debug_mode("error")`` around every UNet
  call (its hooks included), so any ``.item()``, ``nonzero`` or device-to-host copy there raises. CUDA only.
- ``compile``: ``torch.compile(pipe.unet)`` in the default mode, ``max-autotune-no-cudagraphs`` and
  ``reduce-overhead`` (CUDA graphs; CUDA only) inside a pipeline with the lean preset: no graph break, at most
  one graph per phase, a second run compiles nothing new, and the images equal eager ones.

Both run on small pipelines (the suite's tiny UNet, merging forced on at its size) and, for the sync check,
on the SD 1.5 architecture at 1024² with the default as it is, where it acts on a GPU.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

import agentsd

from . import runs

MODES = {"default": None, **{mode: mode for mode in ("max-autotune-no-cudagraphs", "reduce-overhead")}}
STEPS = 6


def forced(schedule: str = "lean"):
    """A preset with merging forced on at any size (``min_tokens=0``)."""
    return {
        level: tuple(dataclasses.replace(p, min_tokens=0) for p in phases)
        for level, phases in agentsd.PRESETS[schedule].items()
    }


def _generate(pipe, size: int, steps: int = STEPS):
    with torch.no_grad():
        return pipe(
            "a photo",
            num_inference_steps=steps,
            height=size,
            width=size,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(0),
        ).images


def no_sync(pipe, size: int, schedule) -> str:
    """Run the pipeline patched with ``schedule``, every UNet call under the sync debug mode "error"."""
    if pipe.device.type != "cuda":
        return "not applicable: needs CUDA"
    agentsd.apply(pipe, schedule, seed=0)
    handles = [
        pipe.unet.register_forward_pre_hook(lambda *a: torch.cuda.set_sync_debug_mode("error"), prepend=True),
        pipe.unet.register_forward_hook(lambda *a: torch.cuda.set_sync_debug_mode("default")),
    ]
    try:
        _generate(pipe, size, steps=4)
        return "passed"
    except RuntimeError as error:
        return f"failed: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for handle in handles:
            handle.remove()
        agentsd.remove(pipe)


def compiled(pipe, size: int, mode: str | None, schedule, backend: str = "inductor") -> dict:
    """Graph breaks, graphs and the largest difference to eager of a compiled, patched pipeline run."""
    from torch._dynamo.utils import counters

    agentsd.apply(pipe, schedule, seed=0)
    eager = _generate(pipe, size)
    agentsd.remove(pipe)
    unet = pipe.unet
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(unet, mode=mode, **({} if backend == "inductor" else {"backend": backend}))
    agentsd.apply(pipe, schedule, seed=0)
    try:
        images = _generate(pipe, size)
        graphs = counters["stats"]["unique_graphs"]
        _generate(pipe, size)  # other dst draws, the same graphs: a second run compiles nothing new
    finally:
        agentsd.remove(pipe)
        pipe.unet = unet
    phases = max(len(p) for p in agentsd.schedule.resolve_schedule(schedule).values())
    scale = eager.abs().max().item()
    result = {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": graphs,
        "graphs_second_run": counters["stats"]["unique_graphs"] - graphs,
        "phases": phases,
        "max_diff_vs_eager": (images - eager).abs().max().item() / scale,
    }
    tolerance = 1e-4 if images.dtype == torch.float32 else 2e-2
    ok = (
        result["graph_breaks"] == 0
        and result["graphs"] <= phases
        and result["graphs_second_run"] == 0
        and result["max_diff_vs_eager"] <= tolerance
    )
    result["status"] = "passed" if ok else "failed"
    return result


def log_sum_exp(device, dtype) -> dict:
    """:func:`agentsd.dit.sdpa_lse` (the near field's fused kernel with its log-sum-exp) against the plain formula in
    float32, with a float mask whose key count is not a multiple of 16 (the CUDA kernel's alignment): the largest
    errors of the output and the log-sum-exp, and whether they lie within half precision's reach."""
    from ..dit import sdpa_lse

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(device, dtype) for n in (40, 37, 37))
    mask = torch.randn(2, 1, 1, 37, generator=g).to(device)
    out, lse = sdpa_lse(q, k, v, mask, 0.125)
    logits = (q.float() @ k.float().transpose(-1, -2)) * 0.125 + mask
    want_lse = logits.logsumexp(dim=-1)
    want = logits.softmax(dim=-1) @ v.float()
    errors = {"out": float((out.float() - want).abs().max()), "lse": float((lse.float() - want_lse).abs().max())}
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return {**errors, "status": "passed" if max(errors.values()) <= tolerance else "FAILED"}


def run(device, dtype, tiny_folder: Path, full_model: str | None = "sd15", full_size: int = 1024) -> dict:
    """Every check; ``full_model``: also the sync check on that architecture at ``full_size`` with the default."""
    device = torch.device(device)
    results = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "no_sync": {}, "compile": {}}
    with tempfile.TemporaryDirectory() as folder, torch.device(device):
        pipe, _ = runs.build_pipeline(str(tiny_folder), "pndm", Path(folder))
    pipe = pipe.to(device=device, dtype=dtype)
    results["no_sync"]["tiny, lean forced"] = no_sync(pipe, 128, forced())
    modes = MODES if device.type == "cuda" else {"default": None}
    results["compile_backend"] = runs.COMPILE_BACKEND
    for name, mode in modes.items():
        results["compile"][name] = compiled(pipe, 128, mode, forced(), runs.COMPILE_BACKEND)
        print(f"compile {name}: {results['compile'][name]}", flush=True)
    if full_model and device.type == "cuda":
        with tempfile.TemporaryDirectory() as folder, torch.device(device):
            big, _ = runs.build_pipeline(full_model, "pndm", Path(folder))
        big = big.to(device=device, dtype=dtype)
        results["no_sync"][f"{full_model} {full_size}², default"] = no_sync(big, full_size, agentsd.schedule.DEFAULT)
    print(f"no_sync: {results['no_sync']}", flush=True)
    results["sdpa_lse"] = log_sum_exp(device, dtype)
    print(f"sdpa_lse: {results['sdpa_lse']}", flush=True)
    results["passed"] = (
        all(v in ("passed", "not applicable: needs CUDA") for v in results["no_sync"].values())
        and all(v["status"] == "passed" for v in results["compile"].values())
        and results["sdpa_lse"]["status"] == "passed"
    )
    return results
