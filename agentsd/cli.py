"""The ``agentsd`` command line.

agentsd generate "a small red circle on the left" -o out.png
agentsd generate "PROMPT" --compare none,tome,agent -o grid.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEEPCACHE = dict(cache_interval=3, cache_branch_id=0)  # as the benchmarks run it


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, no traceback."""


@dataclass
class Render:
    method: str
    images: list  # PIL images
    seconds_per_image: float
    settings: dict


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line (no usage block), like every other bad input."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.print_help()
            return 2
        return args.run(args)
    except UsageError as error:
        print(f"agentsd: error: {error}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """What the libraries print that does not concern a command's user (transformers' notices about image processors
    no command uses, the nested "Loading weights" bars), silenced for the command line only: importing agentsd
    changes no library's settings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


_GENERATE_HELP = """models: the shipped models (demo, the default: a UNet; demo-flux: a miniature Flux.1; offline,
128² images), or any diffusers folder or hub id of Stable Diffusion 1.x/2.x/XL/3/3.5, Flux.1 (txt2img, img2img,
Kontext, ...) or Wan 2.x video.
methods: none; agent (the --schedule, by default the model's default: lean on a UNet, sd3, flux or wan on those
DiTs); any preset: {presets}; deepcache and deepcache+<agent or preset> (UNets, pip install deepcache).
example: agentsd generate "a small red circle on the left" --compare none,lean,fast -o grid.png"""


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .schedule import PRESETS

    parser = _Parser(prog="agentsd", description="Training-free agent attention for Stable Diffusion and DiTs.")
    parser.add_argument("--version", action="version", version=f"agentsd {__version__}")
    commands = parser.add_subparsers(title="commands")

    gen = commands.add_parser(
        "generate",
        help="generate images (or videos), with or without agent attention",
        epilog=_GENERATE_HELP.format(presets=", ".join(PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", nargs="?", help="what to draw, in quotes")
    gen.add_argument(
        "--prompts",
        type=Path,
        help="a text file, one prompt a line: one image per line into the --output folder (NNNNN.png, the line's "
        "number from 0, at --seed + that number; existing images are kept, so a run resumes), split between the "
        "processes of torchrun or accelerate launch (--device auto: each its own GPU)",
    )
    gen.add_argument(
        "--model", help="demo (default), demo-flux (the shipped models), or a hub id or local diffusers folder"
    )
    gen.add_argument(
        "--method",
        default="agent",
        help="none, agent (the --schedule; default), a preset, deepcache, or deepcache+<agent or preset>",
    )
    gen.add_argument("--compare", help="comma-separated methods rendered from the same seed into one grid")
    gen.add_argument(
        "--repeats", type=int, help="runs per method, interleaved; the fastest is printed (default 2 with --compare)"
    )
    gen.add_argument(
        "--schedule",
        help="for --method agent: lean (default), paper, fast, tome, or a JSON file of phases ([...] or {level: ...})",
    )
    gen.add_argument("--steps", type=int, help="sampling steps (default: 50, or the demo model's own)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: 7.5, or the demo model's own)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", help="WIDTHxHEIGHT or N, multiples of 8 (default: the model's own)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--frames", type=int, help="video pipelines (Wan): frames per video (default: the pipeline's)")
    gen.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    gen.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        help="a .png (default out.png); for a video pipeline a .mp4 (needs imageio and imageio-ffmpeg) or a .png name "
        "for its frames; with --prompts a folder (default out/)",
    )
    gen.set_defaults(run=generate)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(title="benchmarks")
    speed = bench.add_parser("speed", help="time UNet forwards: vanilla vs ToMe vs agent attention vs a ceiling")
    speed.set_defaults(run=_bench_speed)
    quality = bench.add_parser("quality", help="FID/KID, PSNR/SSIM, caption accuracy and s/image per method")
    quality.set_defaults(run=_bench_quality)
    suite = bench.add_parser("suite", help="the GPU suite: SD 1.5 and SDXL, forwards and whole runs, compile")
    suite.set_defaults(run=_bench_suite)
    blocks = bench.add_parser(
        "blocks", help="time Flux or Wan blocks at the real width and token count: vanilla, ceilings, preset phases"
    )
    blocks.set_defaults(run=_bench_blocks)
    ops = bench.add_parser("ops", help="count the kernel ops of one UNet call per preset and phase")
    ops.set_defaults(run=_bench_ops)
    traffic = bench.add_parser(
        "traffic", help="bytes per rank and attention call under context parallelism: agentsd, Ulysses, ring"
    )
    traffic.set_defaults(run=_bench_traffic)
    report = bench.add_parser("report", help="render the tables of README.md and docs/ from benchmarks/results/")
    report.set_defaults(run=_bench_report)
    from .bench import blocks as blocks_bench
    from .bench import ops as ops_bench
    from .bench import quality as quality_bench
    from .bench import report as report_bench
    from .bench import speed as speed_bench
    from .bench import suite as suite_bench
    from .bench import traffic as traffic_bench

    speed_bench.add_arguments(speed)
    blocks_bench.add_arguments(blocks)
    quality_bench.add_arguments(quality)
    suite_bench.add_arguments(suite)
    ops_bench.add_arguments(ops)
    report_bench.add_arguments(report)
    traffic_bench.add_arguments(traffic)

    cal = commands.add_parser(
        "calibrate", help="measure from how many tokens the lean path pays on this device, and remember it"
    )
    cal.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    cal.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")
    cal.add_argument("--compile", action="store_true", help="measure under torch.compile (one graph per size)")
    cal.add_argument("--model", default="sd15", help="sd15, sdxl, demo or a diffusers folder (random weights)")
    cal.add_argument("--sizes", type=int, nargs="+", help="image sides to time (default: by device)")
    cal.add_argument("--repeats", type=int, default=5)
    cal.add_argument("--out", type=Path, help="also write the measurement here as JSON (e.g. beside a suite's results)")
    cal.set_defaults(run=_calibrate)
    return parser


def _calibrate(args) -> int:
    from . import calibration
    from .bench import calibrate, core

    if args.repeats < 1 or (args.sizes and min(args.sizes) < 8):
        raise UsageError("--repeats must be >= 1 and --sizes at least 8 pixels")
    try:
        core.model_folder(args.model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    device = _device(args.device)
    result = calibrate.calibrate(
        device,
        _dtype(args.dtype, device),
        model=args.model,
        sizes=tuple(args.sizes) if args.sizes else None,
        compiled=args.compile,
        repeats=args.repeats,
    )
    print(f"{result['key']}: the lean path from {result['min_tokens']} tokens (saved to {calibration.cache_path()})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _bench_report(args) -> int:
    from .bench import report

    try:
        return report.bench(args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _bench_traffic(args) -> int:
    from .bench import traffic

    return traffic.bench(args)


def _bench_blocks(args) -> int:
    from .bench import blocks

    try:
        return blocks.bench(args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _bench_ops(args) -> int:
    from .bench import core, ops

    try:
        core.model_folder(args.model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _device(args.device)
    return ops.bench(args)


def _bench_suite(args) -> int:
    from .bench import suite

    if args.steps < 1 or args.repeats < 1:
        raise UsageError("--steps and --repeats must be >= 1")
    _device(args.device)  # a clear line when CUDA is asked for and missing
    return suite.bench(args)


def _bench_speed(args) -> int:
    from .bench import core, speed

    try:
        core.model_folder(args.model)
        speed.check_arguments(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return speed.bench(args)


def _bench_quality(args) -> int:
    from .bench import quality

    if args.num < 1 or args.steps < 1 or args.batch < 1:
        raise UsageError("--num, --steps and --batch must be >= 1")
    if any(m.startswith("deepcache") for m in args.methods):
        try:
            import DeepCache  # noqa: F401
        except ImportError:
            raise UsageError("the deepcache methods need the deepcache package: pip install deepcache") from None
    args.guidance = _guidance(args.guidance, args.model)
    try:
        quality.load_prompts(args.prompts, args.num, args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.reference is not None and not args.reference.is_dir():
        raise UsageError(f"reference folder not found: {args.reference}")
    if args.real_vs_real is not None and not args.real_vs_real.is_file():
        raise UsageError(f"real-vs-real file not found: {args.real_vs_real}")
    if args.clip_model is not None and not (Path(args.clip_model) / "config.json").is_file():
        raise UsageError(f"CLIP model folder not found (no config.json): {args.clip_model}")
    if args.inception_weights is not None:
        if not Path(args.inception_weights).is_file():
            raise UsageError(f"Inception weights file not found: {args.inception_weights}")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise UsageError(
                "Inception features need torch-fidelity (it brings torchvision): pip install torch-fidelity"
            ) from None
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise UsageError("bench quality needs torchmetrics: pip install 'agentsd[quality]'") from None

    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")
    args.size = _size(args.size)

    def load(model, device, dtype):
        device = _device(device) if isinstance(device, str) else device
        pipe, name = _load(model, device, _dtype(dtype, device))
        if args.frames is not None and not _is_video(pipe):
            raise UsageError(f"--frames is for video pipelines; {type(pipe).__name__} makes images")
        return pipe, name

    return quality.bench(args, load)


def generate(args) -> int:
    if args.prompts is not None:
        lines = _prompt_lines(args)
    elif not args.prompt:
        raise UsageError('generate needs a prompt, e.g.: agentsd generate "a small red circle on the left" -o out.png')
    else:
        args.output = args.output or Path("out.png")
    methods = _methods(args.compare if args.compare else args.method)
    if not args.compare and len(methods) > 1:
        raise UsageError(f"--method takes one method, got {args.method!r}; use --compare to render several")
    if args.schedule is not None and not any(m.removeprefix("deepcache+") == "agent" for m in methods):
        raise UsageError("--schedule applies to --method agent")
    repeats = args.repeats if args.repeats is not None else (2 if args.compare else 1)
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    if any(m.startswith("deepcache") for m in methods):
        try:
            import DeepCache  # noqa: F401
        except ImportError:
            raise UsageError("the deepcache methods need the deepcache package: pip install deepcache") from None
    if args.steps is None:
        args.steps = _demo_setting(args.model, 1) or 50
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.prompts is None and args.output.suffix.lower() not in (".png", ".mp4"):
        raise UsageError(f"--output must be a .png file (or a .mp4 for a video pipeline), got {args.output}")
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")
    size = _size(args.size)
    schedule = _schedule(args.schedule)
    args.guidance = _guidance(args.guidance, args.model)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    pipe, model_name = _load(args.model, device, dtype)
    if getattr(pipe, "unet", None) is None and any(m.startswith("deepcache") for m in methods):
        raise UsageError(f"DeepCache caches UNet features; {type(pipe).__name__} has no UNet: drop deepcache")
    video = _is_video(pipe)
    if args.prompts is not None:
        if video:
            raise UsageError(f"--prompts makes one image per line; {type(pipe).__name__} makes videos: give one prompt")
        return _generate_lines(pipe, model_name, methods[0], schedule, args, size, lines, device, dtype)
    if not video and (args.frames is not None or args.output.suffix.lower() == ".mp4"):
        raise UsageError(f"--frames and a .mp4 --output are for video pipelines; {type(pipe).__name__} makes images")
    if video and args.output.suffix.lower() == ".mp4":
        from diffusers.utils.import_utils import is_imageio_available

        if not is_imageio_available():
            raise UsageError("writing a .mp4 needs imageio: pip install imageio imageio-ffmpeg (or give a .png name)")

    renders = {}
    for _ in range(repeats):  # interleaved, so that drift in the machine's load hits every method alike
        for method in methods:
            render = _render(pipe, method, schedule, args, size)
            if method in renders and renders[method].seconds_per_image < render.seconds_per_image:
                render.seconds_per_image = renders[method].seconds_per_image
            renders[method] = render
    renders = list(renders.values())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, model_name, device, dtype)
    if video:
        paths = _save_video(renders, args.output, meta)
    elif args.compare:
        grid = _grid(renders)
        grid.save(
            args.output,
            pnginfo=_png_info(
                {**meta, "methods": [r.method for r in renders], "settings": {r.method: r.settings for r in renders}}
            ),
        )
        paths = [args.output]
    else:
        (render,) = renders
        paths = _numbered(args.output, len(render.images))
        for image, path in zip(render.images, paths):
            image.save(path, pnginfo=_png_info({**meta, "method": render.method, "settings": render.settings}))
    unit = "video" if video else "image"
    for render in renders:
        fastest = f" (fastest of {repeats} runs)" if repeats > 1 else ""
        print(f"{render.method}: {render.seconds_per_image:.2f} s/{unit}{fastest}")
    print("saved " + ", ".join(str(p) for p in paths))
    return 0


def _prompt_lines(args) -> dict[int, str]:
    """The prompts of ``--prompts`` by line number (from 0; blank lines make no image), after checking the options
    that go with it."""
    if args.prompt:
        raise UsageError("give one prompt or --prompts FILE, not both")
    if args.compare:
        raise UsageError("--prompts renders one method (--method); --compare is for one prompt")
    if args.num_images != 1:
        raise UsageError("--prompts makes one image per line: drop --num-images")
    if args.repeats not in (None, 1):
        raise UsageError("--repeats times one prompt; --prompts makes each image once")
    if not args.prompts.is_file():
        raise UsageError(f"--prompts: no such file {args.prompts}")
    args.output = args.output or Path("out")
    if args.output.suffix.lower() in (".png", ".mp4"):
        raise UsageError(f"with --prompts, --output is a folder for the images, got {args.output}")
    lines = {k: line.strip() for k, line in enumerate(args.prompts.read_text(encoding="utf-8").splitlines())}
    lines = {k: line for k, line in lines.items() if line}
    if not lines:
        raise UsageError(f"--prompts: {args.prompts} holds no prompt")
    return lines


def _meta(args, model_name: str, device, dtype) -> dict:
    """What a PNG says of how it was made (the method and its settings added where they are known)."""
    return {
        "prompt": args.prompt,
        "seed": args.seed,
        "model": model_name,
        "steps": args.steps,
        "guidance": args.guidance,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _processes() -> tuple[int, int]:
    """This process's rank and the number of processes, as torchrun and accelerate launch set them (else 0, 1)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} does not lie in WORLD_SIZE={world}")
    return rank, world


def _generate_lines(pipe, model_name, method, schedule, args, size, lines, device, dtype) -> int:
    """One image per prompt line into the output folder, this process's share of them (line k to process k mod the
    number of processes); images already there are kept."""
    import copy

    from tqdm.auto import tqdm

    rank, world = _processes()
    args.output.mkdir(parents=True, exist_ok=True)
    mine = [k for k in lines if k % world == rank]
    todo = [k for k in mine if not (args.output / f"{k:05d}.png").exists()]
    for k in tqdm(todo, desc=f"process {rank} of {world}" if world > 1 else "images", disable=not todo):
        line = copy.copy(args)
        line.prompt, line.seed = lines[k], args.seed + k
        render = _render(pipe, method, schedule, line, size, progress=False)
        meta = {
            **_meta(line, model_name, device, dtype),
            "line": k,
            "method": render.method,
            "settings": render.settings,
        }
        path = args.output / f"{k:05d}.png"
        partial = path.with_name(f".{path.name}.{rank}")  # written whole, then renamed: a stopped run leaves no half
        render.images[0].save(partial, format="png", pnginfo=_png_info(meta))
        partial.replace(path)
    kept = len(mine) - len(todo)
    print(f"{len(todo)} images saved to {args.output} ({kept} of this process's {len(mine)} were there already)")
    return 0


def _is_video(pipe) -> bool:
    import inspect

    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def _save_video(renders: list[Render], output: Path, meta: dict) -> list[Path]:
    """Each video's frames, the methods side by side in every frame (one method: its frames as they are), as a .mp4
    (``export_to_video``) or as numbered .png frames; the first video of a batch."""
    from PIL import Image

    frames = []
    for k in range(len(renders[0].images[0])):
        parts = [render.images[0][k] for render in renders]
        if len(parts) == 1:
            frames.append(parts[0])
            continue
        frames.append(
            _grid([Render(r.method, [part], r.seconds_per_image, r.settings) for r, part in zip(renders, parts)])
        )
    if output.suffix.lower() == ".mp4":
        from diffusers.utils import export_to_video

        export_to_video(frames, str(output), fps=16)
        return [output]
    paths = [output.with_name(f"{output.stem}-f{k:03d}.png") for k in range(len(frames))]
    info = _png_info(
        {**meta, "methods": [r.method for r in renders], "settings": {r.method: r.settings for r in renders}}
    )
    for frame, path in zip(frames, paths):
        Image.Image.save(frame, path, pnginfo=info)
    return paths


# The models shipped in the package, by the name --model takes: the names in agentsd.demo of their loader and of
# the steps and guidance their quality was measured at.
_DEMOS = {
    "demo": ("load_pipeline", "STEPS", "GUIDANCE"),
    "demo-flux": ("load_flux_pipeline", "FLUX_STEPS", "FLUX_GUIDANCE"),
}


def _demo_kind(model: str | None) -> str | None:
    """The row of ``_DEMOS`` a model is: its name (``None`` is ``demo``), or ``demo-flux`` for a folder a proving
    ground's training recipe exported (it holds ``agentsd_demo.json``: another stage of the DiT proving ground, loaded
    with that model's settings); ``None`` for other models."""
    from .demo.flux import SETTINGS_FILE

    name = model or "demo"
    if name in _DEMOS:
        return name
    return "demo-flux" if (Path(name).expanduser() / SETTINGS_FILE).is_file() else None


def _demo_setting(model: str | None, k: int):
    """Entry ``k`` of a shipped model's row of ``_DEMOS`` (see ``_demo_kind``), looked up in agentsd.demo; ``None``
    for other models."""
    kind = _demo_kind(model)
    if kind is None:
        return None
    from . import demo

    return getattr(demo, _DEMOS[kind][k])


def _guidance(value: float | None, model: str | None) -> float:
    """The guidance scale asked for, else a shipped model's own (``demo`` without ``--model``) or 7.5."""
    if value is None:
        return _demo_setting(model, 2) or 7.5
    if not math.isfinite(value):
        raise UsageError(f"--guidance must be a finite number, got {value}")
    return value


def methods_known() -> list[str]:
    """What ``--method`` and ``--compare`` take: none, agent (the ``--schedule``), every preset, DeepCache alone
    and DeepCache with each of them."""
    from .schedule import PRESETS

    agents = ["agent", *PRESETS]
    return ["none", *agents, "deepcache", *(f"deepcache+{m}" for m in agents)]


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = methods_known()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UsageError(f"unknown method {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}")
    if len(set(methods)) < len(methods):
        raise UsageError(f"a method is named twice in {text!r}")
    return methods


def _size(text: str | None) -> tuple[int, int] | None:
    """``WxH`` or ``N`` -> ``(height, width)``."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise UsageError(f"--size must look like 512x512 or 512, got {text!r}") from None
    if len(parts) > 2 or width <= 0 or height <= 0 or width % 8 or height % 8:
        raise UsageError(f"--size must be positive multiples of 8 (WIDTHxHEIGHT), got {text!r}")
    return height, width


def _schedule(text: str | None):
    from .schedule import PRESETS, Phase, resolve_schedule

    if text is None or text in PRESETS:
        return text  # None: agentsd.apply's default for the model (lean on a UNet, sd3 on an SD 3 transformer)
    path = Path(text)
    if path.suffix != ".json":
        raise UsageError(f"--schedule must be one of {', '.join(PRESETS)} or a .json file, got {text!r}")
    if not path.is_file():
        raise UsageError(f"schedule file not found: {path}")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # {"0": [phases of level 0], "1": [...]}
            return resolve_schedule({int(level): [Phase(**p) for p in phases] for level, phases in data.items()})
        return resolve_schedule([Phase(**phase) for phase in data])
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise UsageError(f"bad schedule file {path}: {error}") from None


def _device(text: str):
    import torch

    if text == "auto":
        if torch.cuda.is_available():  # under torchrun or accelerate launch, each process its own card
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but CUDA is not available")
    return device


def _dtype(text: str, device):
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if text == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if text not in dtypes:
        raise UsageError(f"unknown dtype {text!r}; choose auto, fp32, fp16 or bf16")
    return dtypes[text]


def _load(model: str | None, device, dtype):
    """The pipeline and a name for it; clear errors for folders that are not there and hubs out of reach."""
    kind = _demo_kind(model)
    if kind is not None:
        from . import demo

        shipped = (model or "demo") == kind  # else a folder the recipe exported
        folder = {} if shipped else {"folder": Path(model).expanduser()}
        try:
            pipe = getattr(demo, _DEMOS[kind][0])(device=device, dtype=dtype, **folder)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        return pipe, f"agentsd-{kind}" + ("" if shipped else f" ({model})")
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    # Hub ids are "name" or "org/name"; anything else that looks like a path is one.
    local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if local:
        if not path.is_dir():
            raise UsageError(f"model folder not found: {path}")
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        source, options = str(path), {"local_files_only": True}
    else:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise UsageError(f"{model!r} is a hub id but HF_HUB_OFFLINE is set; pass a local folder instead")
        source, options = model, {}
    try:
        # DiffusionPipeline picks the class (SD 1.x/2.x, SDXL, ...) from the folder's model_index.json.
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"could not load model {model!r}: {first_line}") from None
    from .patch import _find_unets

    try:
        _find_unets(pipe)
    except TypeError as error:
        raise UsageError(f"{model!r}: {error}") from None
    return pipe.to(device), model


def _render(pipe, method: str, schedule, args, size, progress: bool = True) -> Render:
    import torch

    import agentsd

    settings = {}
    undo = []
    base = method.removeprefix("deepcache+") if method != "deepcache" else "none"
    if method.startswith("deepcache"):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(**DEEPCACHE)
        helper.enable()
        undo.append(helper.disable)
        settings["deepcache"] = DEEPCACHE
    if base != "none":
        schedule = schedule if base == "agent" else base
        if schedule is None:  # the model's default
            from .patch import default_schedule

            schedule = default_schedule(pipe)
        agentsd.apply(pipe, schedule, seed=args.seed)
        undo.append(lambda: agentsd.remove(pipe))
        settings["schedule"] = _describe(schedule)
    pipe.set_progress_bar_config(disable=not progress, desc=f"{method:5s}", leave=True)
    height, width = size if size else (None, None)
    try:
        options = dict(
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(args.seed),
        )
        if _is_video(pipe):
            options.update(num_videos_per_prompt=args.num_images, output_type="pil")
            if args.frames is not None:
                options["num_frames"] = args.frames
        else:
            options["num_images_per_prompt"] = args.num_images
        start = time.perf_counter()
        out = pipe(args.prompt, **options)
        images = out.frames if _is_video(pipe) else out.images  # a video: a list of frames
        seconds = time.perf_counter() - start
    finally:
        for fn in reversed(undo):
            fn()
    return Render(method, images, seconds / len(images), settings)


def _describe(schedule):
    """A schedule as JSON-ready data: a preset's name, a list of phases, or ``{level: phases}``."""
    if isinstance(schedule, str):
        return schedule
    if isinstance(schedule, dict):
        return {str(level): _describe(phases) for level, phases in schedule.items()}
    return [vars(phase) for phase in schedule]


def _numbered(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    return info


GRID_MIN_SIDE = 256  # small images are enlarged (nearest neighbour) to at least this many pixels in a grid


def _grid(renders: list[Render]):
    """Methods side by side (columns), images of a batch below each other, each with its method and s/image under
    it; images smaller than ``GRID_MIN_SIDE`` enlarged by a whole factor so that a person can see them."""
    from PIL import Image, ImageDraw

    width, height = renders[0].images[0].size
    scale = max(1, math.ceil(GRID_MIN_SIDE / min(width, height)))
    width, height = width * scale, height * scale
    label = 16
    rows = len(renders[0].images)
    grid = Image.new("RGB", (width * len(renders), (height + label) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for col, render in enumerate(renders):
        for row, image in enumerate(render.images):
            top = row * (height + label)
            grid.paste(image.resize((width, height), Image.NEAREST), (col * width, top))
            caption = f"{render.method}  {render.seconds_per_image:.2f} s/image"
            draw.text((col * width + 4, top + height + 2), caption, fill="black")
    return grid


if __name__ == "__main__":
    sys.exit(main())
