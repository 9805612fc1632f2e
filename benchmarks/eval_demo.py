"""Measure the shipped demo model and evaluator; write ``benchmarks/results/demo_model.json``.

Records: shipped weight sizes, the evaluator's accuracy on fresh generator images,
vanilla caption accuracy on held-out one- and two-object captions, the time of a
4-image generation, and (with ``--run``) the training recipe's wall time from its log.

    python benchmarks/eval_demo.py --run runs/demo
    python benchmarks/eval_demo.py --flux --run runs/flux --guidance 2 3 4.5   # the DiT proving ground
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from agentsd.demo import FLUX_MODEL_DIR, MODEL_DIR, Evaluator, load_flux_pipeline, load_pipeline, prompts, sample
from agentsd.demo.data import IMAGE_SIZE
from agentsd.demo.evaluator import WEIGHTS

RESULTS = Path(__file__).parent / "results" / "demo_model.json"


def weight_sizes(model_dir: Path = MODEL_DIR, evaluator: Path = WEIGHTS) -> dict[str, int]:
    """Bytes of each weights file: the model's by path relative to the model folder's parent, the evaluator's by
    its file name (it need not lie beside the model)."""
    sizes = {str(f.relative_to(model_dir.parent)): f.stat().st_size for f in sorted(model_dir.glob("*/*.safetensors"))}
    return {**sizes, evaluator.name: evaluator.stat().st_size}


def generate(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch: int) -> torch.Tensor:
    """Images in [0, 1], ``(N, 3, side, side)``; batch ``k`` uses generator seed ``seed + k``."""
    out = []
    for k, start in enumerate(range(0, len(captions), batch)):
        gen = torch.Generator().manual_seed(seed + k)
        out.append(
            pipe(
                captions[start : start + batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gen,
                output_type="pt",
            ).images
        )
    return torch.cat(out)


def caption_accuracy(
    pipe, evaluator, n: int, num_objects: int, steps: int, guidance: float, seed: int, batch: int
) -> dict:
    scenes = prompts(n, seed=seed, num_objects=num_objects)
    start = time.perf_counter()
    images = generate(pipe, [s.caption for s in scenes], steps, guidance, seed, batch)
    seconds = time.perf_counter() - start
    return {**evaluator.accuracy(images, scenes).__dict__, "generation_s": round(seconds, 1)}


def batch_time(pipe, steps: int, guidance: float, repeats: int = 3) -> list[float]:
    captions = [s.caption for s in prompts(4, seed=99)]
    generate(pipe, captions, steps, guidance, 0, 4)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(pipe, captions, steps, guidance, 0, 4)
        times.append(round(time.perf_counter() - start, 3))
    return times


def real_scale(evaluator, n: int, seed: int, folder: Path | None, size: int = IMAGE_SIZE) -> dict:
    """FID/KID (evaluator features) between two disjoint sets of ``n`` real one-object test images.

    The first set is the real counterpart of ``agentsd bench quality --prompts demo:1 --num n --seed seed``
    (the same held-out scenes, drawn from the same stream); with ``folder`` it is written there as PNGs,
    to pass as that command's ``--reference``. The second set comes from stream ``seed + 1``. ``size``: the images'
    side (the demo world's 128; 256 for the 1,024-token DiT ground, whose images are 256²).
    """
    from PIL import Image

    from agentsd.bench.quality import distribution_metrics

    first = sample(n, seed=seed, num_objects=1, split="test", size=size).images
    second = sample(n, seed=seed + 1, num_objects=1, split="test", size=size).images
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(first):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return {"n": n, "size": size, "streams": [seed, seed + 1], **distribution_metrics(evaluator, second, first)}


def recipe(run: Path) -> dict:
    """The training run's config, its wall time and each stage's share of it, from the log.

    A run resumed after an interruption logs each invocation from its own start: the wall
    time is the sum over invocations, and a stage's time the sum of its invocations' spans.
    """
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    invocations, stages = [], {}
    for row in rows:
        if row["stage"] == "start":
            invocations.append([])
        invocations[-1].append(row)
    for rows_of_one in invocations:
        previous = 0.0
        for row in rows_of_one:
            if row["stage"] not in ("start", "threads", "done"):
                stages[row["stage"]] = stages.get(row["stage"], 0.0) + row["time"] - previous
            previous = row["time"]
    wall = sum(r[-1]["time"] for r in invocations)
    return {
        "config": json.loads((run / "config.json").read_text()),
        "invocations": len(invocations),
        "stage_s": {k: round(v, 1) for k, v in stages.items()},
        "wall_s": round(wall, 1),
        "finished": rows[-1]["stage"] == "done",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="captions per setting")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, help="training run folder, for the recipe's wall time")
    parser.add_argument("--flux", action="store_true", help="the DiT proving ground (a FluxPipeline folder)")
    parser.add_argument("--model", type=Path, help="pipeline folder (default: the shipped one)")
    parser.add_argument("--evaluator", type=Path, default=WEIGHTS, help="evaluator weights (default: the shipped)")
    parser.add_argument("--out", type=Path, help="default: results/demo_model.json (--flux: demo_flux_model.json)")
    parser.add_argument("--real-n", type=int, default=1000, help="images per set for the real-vs-real FID/KID")
    parser.add_argument("--real-dir", type=Path, help="write the first real set here (a bench quality reference)")
    parser.add_argument(
        "--real-size", type=int, default=IMAGE_SIZE, help="the real images' side (256: the 1,024-token ground)"
    )
    parser.add_argument(
        "--real-only", action="store_true", help="only write the real set (--real-dir) and its real-vs-real FID/KID"
    )
    args = parser.parse_args()
    args.model = args.model or (FLUX_MODEL_DIR if args.flux else MODEL_DIR)
    args.out = args.out or (RESULTS.with_name("demo_flux_model.json") if args.flux else RESULTS)
    torch.set_num_threads(args.threads)
    if args.real_only:
        scale = real_scale(Evaluator.load(args.evaluator), args.real_n, args.seed, args.real_dir, args.real_size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(scale, indent=1) + "\n")
        print(json.dumps(scale))
        return

    pipe = (load_flux_pipeline if args.flux else load_pipeline)(dtype=torch.float32, folder=args.model)
    evaluator = Evaluator.load(args.evaluator)
    real = {}
    for k in (1, 2):
        batch = sample(1000, seed=args.seed, num_objects=k, split="test")
        real[f"{k}_object"] = evaluator.accuracy(batch.images, batch.scenes).__dict__
    generated = {
        str(g): {
            f"{k}_object": caption_accuracy(pipe, evaluator, args.n, k, args.steps, g, args.seed, args.batch)
            for k in (1, 2)
        }
        for g in args.guidance
    }
    scale = real_scale(evaluator, args.real_n, args.seed, args.real_dir, args.real_size)
    times = batch_time(pipe, args.steps, args.guidance[0])
    sizes = weight_sizes(args.model, args.evaluator)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "weights_bytes": sizes,
        "model": str(args.model),
        "weights_total_bytes": sum(sizes.values()) - args.evaluator.stat().st_size,
        "recipe": recipe(args.run) if args.run else None,
        "evaluator_on_real_test_images": real,
        "vanilla_caption_accuracy": {"steps": args.steps, "n": args.n, "seed": args.seed, "by_guidance": generated},
        "real_vs_real": scale,
        "generate_4_images_25_steps_s": {
            "steps": args.steps,
            "guidance": args.guidance[0],
            "times": times,
            "median": statistics.median(times),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
