"""Time whole sampling runs: a real diffusers pipeline around the UNet under test, every method in one process.

The UNet is built from its config with random weights; the text encoders and the VAE are
minimal (one small CLIP layer of the right width, a VAE with the right downsampling that is
never run: ``output_type="latent"``), so the time is the sampling loop's. Each schedule's
phases weigh in as they really run, and step caching (DeepCache) can join. Peak memory
beside each time: the largest resident set seen while the run lasts, above the level it
started from (CPU), or ``torch.cuda.max_memory_allocated`` (CUDA).

    agentsd bench speed --pipeline --sizes 512 --steps 20                  # SD 1.5 architecture
    agentsd bench speed --pipeline --model sdxl --sizes 1024 --methods vanilla fast deepcache+fast
    agentsd bench speed --pipeline --fresh 5 --sizes 512 --steps 4 --repeats 1 --warmup 0   # memory, 5 processes each

In one process a method's peak can hide under memory an earlier method left cached; ``--fresh N`` runs each
method in N new processes of its own (round by round: every method once, then again) and merges their
results. On CPU the resident set of the same run varies from process to process (how the C heap happens to
be laid out; by up to a quarter for SD 1.5 at 512²), so a peak is the median over the processes, with its range.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock

import agentsd

from .core import TOME_RATIO, build_unet, interleave, machine, resume

SCHEDULERS = ("pndm", "ddim", "euler", "dpm")

DEEPCACHE = dict(cache_interval=3, cache_branch_id=0)


def _deepcache(pipe) -> Callable[[], None]:
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise RuntimeError("the deepcache methods need the deepcache package: pip install deepcache") from None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**DEEPCACHE)
    helper.enable()
    return helper.disable


def _agentsd(pipe, schedule) -> Callable[[], None]:
    agentsd.apply(pipe, schedule, seed=0)
    return lambda: agentsd.remove(pipe)


def _tomesd(pipe) -> Callable[[], None]:
    import tomesd

    tomesd.apply_patch(pipe, ratio=TOME_RATIO, sx=2, sy=2, use_rand=True)
    return lambda: tomesd.remove_patch(pipe)


class _Free:
    """A ceiling's stand-in for a processor or a block: it costs nothing and passes its input on."""

    def __init__(self, original, levels: set[int], latent_tokens: int, zeros: bool):
        self.original, self.levels, self.latent_tokens, self.zeros = original, levels, latent_tokens, zeros

    def level(self, tokens: int) -> int:
        return round((self.latent_tokens / tokens) ** 0.5).bit_length() - 1  # 0 for the top level

    def __call__(self, *args, **kwargs):
        hidden_states = args[1] if self.zeros else (args[0] if args else kwargs["hidden_states"])
        if self.level(hidden_states.shape[1]) in self.levels:
            return torch.zeros_like(hidden_states) if self.zeros else hidden_states
        return self.original(*args, **kwargs)


def _ceiling(pipe, levels: set[int], whole_blocks: bool, size: int) -> Callable[[], None]:
    """Self-attention (or whole transformer blocks) at the given levels made free."""
    unet = pipe.unet
    factor = pipe.vae_scale_factor
    tokens = (size // factor) ** 2
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    if whole_blocks:
        for block in blocks:
            block.forward = _Free(block.forward, levels, tokens, zeros=False)

        def undo():
            for block in blocks:
                del block.forward
    else:
        originals = [b.attn1.processor for b in blocks]
        for block, original in zip(blocks, originals):
            block.attn1.set_processor(_Free(original, levels, tokens, zeros=True))

        def undo():
            for block, original in zip(blocks, originals):
                block.attn1.set_processor(original)

    return undo


# one compiled wrapper per UNet, mode and backend: repeats reuse its compiled graphs
_COMPILED: dict[tuple[int, str | None, str], torch.nn.Module] = {}
COMPILE_MODES = {"compile": None, "compile-cg": "reduce-overhead", "compile-max": "max-autotune-no-cudagraphs"}
# torch.compile's backend for the "+compile" methods; the GPU suite's CPU check (``bench suite --tiny`` on a CPU)
# sets "aot_eager": dynamo's graphs and AOT tracing as on a GPU, without minutes of inductor's C++ code generation
COMPILE_BACKEND = "inductor"


def _compile(pipe, mode: str | None = None) -> Callable[[], None]:
    """``pipe.unet = torch.compile(pipe.unet, mode=mode)``, as diffusers' docs do; agentsd applied after it hooks
    the wrapper. ``"reduce-overhead"`` replays CUDA graphs."""
    unet = pipe.unet
    key = (id(unet), mode, COMPILE_BACKEND)
    if key not in _COMPILED:
        options = {} if COMPILE_BACKEND == "inductor" else {"backend": COMPILE_BACKEND}
        _COMPILED[key] = torch.compile(unet, mode=mode, **options)
    pipe.unet = _COMPILED[key]

    def undo():
        pipe.unet = unet

    return undo


# name -> enable(pipe, size), returning the function that undoes it; composed methods undo in reverse
METHODS: dict[str, Callable] = {
    "vanilla": lambda pipe, size: lambda: None,
    "tomesd": lambda pipe, size: _tomesd(pipe),
    "paper": lambda pipe, size: _agentsd(pipe, "paper"),
    "fast": lambda pipe, size: _agentsd(pipe, "fast"),
    "deepcache": lambda pipe, size: _deepcache(pipe),
    "deepcache+paper": lambda pipe, size: _chain(_deepcache(pipe), _agentsd(pipe, "paper")),
    "deepcache+fast": lambda pipe, size: _chain(_deepcache(pipe), _agentsd(pipe, "fast")),
    "lean": lambda pipe, size: _agentsd(pipe, "lean"),
    "deepcache+lean": lambda pipe, size: _chain(_deepcache(pipe), _agentsd(pipe, "lean")),
    "pooled": lambda pipe, size: _agentsd(pipe, "pooled"),
    **{
        f"{base}+{suffix}": (
            lambda pipe, size, base=base, mode=mode: _chain(
                _compile(pipe, mode), *([] if base == "vanilla" else [_agentsd(pipe, base)])
            )
        )
        for suffix, mode in COMPILE_MODES.items()
        for base in ("vanilla", "fast", "lean")
    },
    "ceiling-attn1-top": lambda pipe, size: _ceiling(pipe, {0}, False, size),
    "ceiling-attn1-levels12": lambda pipe, size: _ceiling(pipe, {0, 1}, False, size),
    "ceiling-blocks-top": lambda pipe, size: _ceiling(pipe, {0}, True, size),
}


def _chain(*undos: Callable[[], None]) -> Callable[[], None]:
    def undo():
        for fn in reversed(undos):
            fn()

    return undo


def letter_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP tokenizer over single letters (with and without the end-of-word mark), written here: no download."""
    import string

    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_encoder(tokenizer, width: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=width,
        intermediate_size=width,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **({} if projection is None else {"projection_dim": projection}),
    )
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def _scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    if name == "ddim":
        return DDIMScheduler(set_alpha_to_one=False, clip_sample=False, **common)
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**common)
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def build_pipeline(model: str, scheduler: str, folder: Path, img2img: bool = False):
    """A real SD (or SDXL) pipeline around a random-weight UNet of ``model``; minimal text encoders and VAE.

    ``img2img``: the image-to-image pipeline of the same components (a hi-res pass starts from latents)."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    unet, vae_factor, name = build_unet(model)
    levels = vae_factor.bit_length()  # a VAE with k levels downsamples by 2^(k-1)
    vae = AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=unet.config.in_channels,
        norm_num_groups=8,
        layers_per_block=1,
    )
    tokenizer = letter_tokenizer(folder)
    width = unet.config.cross_attention_dim
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        first = width - pooled if width > pooled else width // 2
        pipe = (StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline)(
            vae=vae,
            text_encoder=_text_encoder(tokenizer, first),
            text_encoder_2=_text_encoder(tokenizer, width - first, projection=pooled),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=_scheduler(scheduler),
        )
    else:
        pipe = (StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline)(
            vae=vae,
            text_encoder=_text_encoder(tokenizer, width),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


class _PeakMemory:
    """Peak memory of the block it wraps, above where it started: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.start


def heap_settings() -> dict[str, str]:
    """glibc's heap tunables set in the environment (``MALLOC_MMAP_THRESHOLD_`` and the like, ``GLIBC_TUNABLES``)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


def _rss() -> int:
    """Resident set size of this process, bytes (Linux ``/proc``; 0 where it is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def time_run(pipe, size: int, steps: int, device, strength: float | None = None) -> tuple[float, int]:
    """Seconds of one whole generation (batch of one prompt with guidance: the UNet sees batch 2) and its
    peak memory above the start, bytes. ``strength``: image-to-image from random latents of ``size``."""
    if strength is None:
        task = dict(height=size, width=size)
    else:
        factor = pipe.vae_scale_factor
        latents = torch.randn(1, pipe.unet.config.in_channels, size // factor, size // factor, generator=_seeded(0))
        task = dict(image=latents.to(device=device, dtype=pipe.unet.dtype), strength=strength)
    with _PeakMemory(device) as memory, torch.no_grad():
        start = time.perf_counter()
        pipe(
            "a photo",
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="latent",
            generator=_seeded(0),
            **task,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory.extra


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


DEFAULT_METHODS = [m for m in METHODS if "+compile" not in m]  # compiling takes minutes on CPU


WARMUP_STEPS = 4  # a warm-up run goes through every phase of every preset (and compiles each) in this many steps


def run(
    model, sizes, methods, repeats, warmup, steps, scheduler, dtype, device, out: Path, deadline=None, strength=None
) -> dict:
    """Measure every size (methods interleaved repeat by repeat); sizes already in ``out`` are kept.

    Warm-up runs take ``WARMUP_STEPS`` steps (enough to meet every phase and compile it); ``deadline`` as in
    ``speed.run``; ``strength``: image-to-image runs (a hi-res pass) of that strength."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder, torch.device(device):
        pipe, name = build_pipeline(model, scheduler, Path(folder), img2img=strength is not None)
    pipe = pipe.to(device=device, dtype=dtype)
    setup = {
        "kind": "pipeline",
        **machine(device, dtype),
        "model": name,
        "pipeline": type(pipe).__name__,
        "scheduler": scheduler,
        "steps": steps,
        **({} if strength is None else {"strength": strength}),
        "tome_ratio": TOME_RATIO,
        "deepcache": DEEPCACHE,
    }
    heap = heap_settings() if device.type == "cpu" else {}
    if heap:
        setup["heap"] = heap  # they change the resident set: a run under other settings starts afresh
    results = resume(out, setup)
    warmup_steps = min(steps, WARMUP_STEPS)

    def once(size: int, which: str) -> tuple[float, int]:
        return time_run(pipe, size, warmup_steps if which == "warm-up" else steps, device, strength)

    interleave(
        results,
        out,
        sizes,
        methods,
        enable=lambda method, size: METHODS[method](pipe, size),
        once=once,
        summarize=summarize,
        warmup=warmup,
        repeats=repeats,
        deadline=deadline,
        record={"warmup_steps": warmup_steps},
    )
    return results


def fresh(args, out: Path) -> dict:
    """``run`` for each method in ``args.fresh`` new processes of its own, round by round; the results merged into
    ``out``: the times of every process, and each process's peak memory.

    ``args`` are ``bench speed``'s (``--pipeline``); each process writes its own JSON in a scratch folder.
    Sizes already in ``out`` from the same setup are kept (as ``run`` keeps them), the measured ones replaced."""
    setup = None
    times, memory = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.fresh):
            for method in args.methods:
                path = Path(folder) / f"{method}.json"
                path.unlink(missing_ok=True)
                command = [
                    sys.executable, "-m", "agentsd", "bench", "speed", "--pipeline", "--model", str(args.model),
                    "--sizes", *map(str, args.sizes), "--steps", str(args.steps), "--scheduler", args.scheduler,
                    "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype,
                    "--device", str(args.device), "--methods", method, "--out", str(path),
                ]  # fmt: skip
                if getattr(args, "strength", None) is not None:
                    command += ["--strength", str(args.strength)]
                print(f"{method}: a new process ({round_ + 1} of {args.fresh})", flush=True)
                done = subprocess.run(command)
                if done.returncode != 0:
                    raise RuntimeError(f"the {method} process failed (exit status {done.returncode})")
                one = json.loads(path.read_text())
                for size, measured in one["sizes"].items():
                    times.setdefault(size, {}).setdefault(method, []).extend(measured["times"][method])
                    memory.setdefault(size, {}).setdefault(method, []).append(max(measured["memory_bytes"][method]))
                setup = setup or {k: v for k, v in one.items() if k != "sizes"} | {"processes": "one per method"}
    results = resume(out, setup)
    for size in times:
        results["sizes"][size] = {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "processes_per_method": args.fresh,
        } | summarize(times[size], memory[size], per_process=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def summarize(times: dict[str, list[float]], memory: dict[str, list[int]], per_process: bool = False) -> dict:
    """Median seconds and speed-up over vanilla per method, and the peak memory (MiB).

    ``memory``: peaks above start, one per repeat of one process (the peak is their largest), or with
    ``per_process`` one per process (the peak is their median, ``peak_mib_range`` their smallest and largest)."""
    median = {name: statistics.median(ts) for name, ts in times.items()}
    summary = {"times": times, "memory_bytes": memory, "median": median, "min": {n: min(ts) for n, ts in times.items()}}
    if per_process:
        summary["peak_mib"] = {name: statistics.median(ms) / 2**20 for name, ms in memory.items()}
        summary["peak_mib_range"] = {name: [min(ms) / 2**20, max(ms) / 2**20] for name, ms in memory.items()}
    else:
        summary["peak_mib"] = {name: max(ms) / 2**20 for name, ms in memory.items()}
    if "vanilla" in median:
        summary["speedup_median"] = {name: median["vanilla"] / t for name, t in median.items()}
    return summary


def table(results: dict) -> str:
    lines = [
        f"Whole runs ({results['pipeline']}, {results['model']}), {results['steps']} {results['scheduler']} steps, "
        + (f"image-to-image at strength {results['strength']}, " if "strength" in results else "")
        + f"guidance (UNet batch 2), {results['dtype']}, {results['device']} ({results['threads']} threads)"
        + (", each method in a new process" if results.get("processes") == "one per method" else "")
        + "".join(f", {k}={v}" for k, v in results.get("heap", {}).items()),
        "",
        "| size | method | median s | min s | speed-up (median) | peak memory above start (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for size, summary in results["sizes"].items():
        for name, seconds in summary["median"].items():
            speedup = summary.get("speedup_median", {}).get(name)
            cell = "–" if speedup is None else f"{speedup:.2f}×"
            peak = f"{summary['peak_mib'][name]:.0f}"
            spread = summary.get("peak_mib_range", {}).get(name)
            if spread and summary.get("processes_per_method", 1) > 1:
                peak += f" ({spread[0]:.0f}–{spread[1]:.0f}, median of {summary['processes_per_method']} processes)"
            fastest = summary.get("min", {}).get(name)
            low = "–" if fastest is None else f"{fastest:.4g}"
            lines.append(f"| {size}² | {name} | {seconds:.4g} | {low} | {cell} | {peak} |")
    return "\n".join(lines)


def plot(results: dict, panel: str = "speed"):
    """One question per figure: ``panel="speed"``, the speed-up over vanilla per method, one bar group per size;
    ``"memory"`` (``--fresh`` runs), the peak memory per method (median over the processes, their range as
    whiskers). ``None`` without matplotlib or without data."""
    from . import pyplot

    plt = pyplot()
    memory = results.get("processes") == "one per method"
    if plt is None or not results["sizes"] or (panel == "memory" and not memory):
        return None
    sizes = sorted(results["sizes"], key=int)
    methods = list(results["sizes"][sizes[0]]["median"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(sizes), 1)
    for k, size in enumerate(sizes):
        summary = results["sizes"][size]
        xs = [i + k * width for i in range(len(methods))]
        if panel == "speed":
            speedups = summary.get("speedup_median", {})
            ax.bar(xs, [speedups.get(m, math.nan) for m in methods], width, label=f"{size}²")
        else:
            peaks = [summary["peak_mib"].get(m, math.nan) for m in methods]
            spread = summary.get("peak_mib_range", {})
            low = [p - spread.get(m, [p, p])[0] for m, p in zip(methods, peaks)]
            high = [spread.get(m, [p, p])[1] - p for m, p in zip(methods, peaks)]
            ax.bar(xs, peaks, width, yerr=[low, high], capsize=3, label=f"{size}²")
    if panel == "speed":
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("speed-up over vanilla (median)")
    else:
        ax.set_ylabel("peak MiB above start (median, range)")
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"Whole runs, {results['model']}, {results['steps']} {results['scheduler']} steps, "
        f"{results['device']}, {results['dtype']}"
        + (", each method in new processes" if memory else "")
        + "".join(f", {k}={v}" for k, v in results.get("heap", {}).items()),
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig
