"""Train the DiT proving ground: a miniature Flux.1 on the demo world, from scratch on the CPU.

A ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE on the patch grid) in a
``FluxPipeline``: 128² images through the demo's factor-4 VAE (32² latents, packed 2×2 into a 16×16
grid of 256 image tokens), the demo's CLIP text encoder for the pooled embedding and a small T5
encoder trained here (as the demo's CLIP was: to read every object's attributes back from the
caption) for the token states. The transformer learns rectified flow (velocity ``noise - x0`` at
``x_t = (1 - σ) x0 + σ noise``, σ logit-normal, shifted as the pipeline shifts it for 256 tokens),
with caption dropout for classifier-free guidance (the pipeline's ``true_cfg_scale``).

Stages: the latent cache (the demo VAE, with the shift and scale the Flux pipeline reads), the T5
encoder, the transformer. Everything resumes from ``<run>`` (checkpoints every two minutes); the time
budget (``--minutes``) counts over every invocation: the transformer's first steps are timed and the
step count that fits what is left is fixed then (``<run>/config.json``).

    python benchmarks/train_flux_demo.py --run runs/flux --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).parent))
import train_demo as demo  # noqa: E402  (the UNet recipe: run folder, checkpoints, tokenizer, EMA, probes)

from agentsd.demo import data  # noqa: E402
from agentsd.demo.flux import SETTINGS_FILE  # noqa: E402
from agentsd.demo.pipeline import MODEL_DIR  # noqa: E402

T5_CONFIG = dict(
    vocab_size=len(demo.SPECIAL) + len(data.vocabulary()),
    d_model=128,
    d_kv=32,
    d_ff=512,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,  # 16 per direction, exact up to 8 tokens: the captions' whole span
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=3,
    decoder_start_token_id=0,
)
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels, packed 2x2
    num_layers=2,  # double-stream blocks
    num_single_layers=6,
    attention_head_dim=32,
    num_attention_heads=6,
    joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=128,  # the demo CLIP's hidden size
    guidance_embeds=False,  # real classifier-free guidance (true_cfg_scale), not a distilled one
    axes_dims_rope=(8, 12, 12),  # (unused frame axis, rows, columns): sums to the head dim
)
SCHEDULER_CONFIG = dict(  # Flux.1's
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
DEFAULTS = dict(
    seed=0,
    cache_size=24576,
    text_steps=1000,  # T5 breaks through later than the demo's CLIP (loss ~1.0 until step ~250 at lr 2e-3)
    text_batch=256,
    text_lr=2e-3,
    dit_batch=32,
    dit_lr=6e-4,
    dit_warmup=200,
    dit_bf16=False,
    minutes=290.0,
    dit_steps=None,
    ema=0.999,
    uncond_prob=0.1,
    spent_s=0.0,  # time spent by earlier invocations (the budget counts over all of them)
    image_size=128,  # 128² -> 256 image tokens, 256² -> 1,024
    init=None,  # a compact checkpoint the transformer and T5 start from (a resolution curriculum's next stage)
)
_T5_SEEDS = 5_000_000


def _tokens_grid(latent_side: int) -> int:
    return (latent_side // 2) ** 2


def load_vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(MODEL_DIR / "vae", dtype=torch.float32).eval().requires_grad_(False)


def build_cache(run: demo.Run, vae: AutoencoderKL, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Raw latent means and token ids of ``cache_size`` training images, and the VAE's shift and scale."""
    path = run.folder / "cache.pt"
    if not path.exists():
        n, chunk = run.config["cache_size"], 256
        latents, ids = [], []
        with torch.no_grad():
            for k in range(math.ceil(n / chunk)):
                batch = data.sample(
                    min(chunk, n - k * chunk),
                    seed=demo._data_seed(run, demo._CACHE_SEEDS + k),
                    num_objects=None,
                    size=run.config["image_size"],
                )
                latents.append(vae.encode(demo._to_unit(batch.images)).latent_dist.mean)
                ids.append(demo._token_ids(tokenizer, batch.captions))
        latents, ids = torch.cat(latents), torch.cat(ids)
        factors = dict(shift_factor=round(latents.mean().item(), 5), scaling_factor=round(1 / latents.std().item(), 5))
        torch.save({"latents": latents, "ids": ids, "factors": factors}, path)
        run.log("cache", n, **factors)
    cache = torch.load(path)
    return cache["latents"], cache["ids"], cache["factors"]


def train_t5(run: demo.Run, tokenizer) -> T5EncoderModel:
    """The T5 encoder, trained like the demo's CLIP: mean of its token states -> linear probe of the attributes."""
    c = run.config
    torch.manual_seed(c["seed"] + 5)
    encoder = T5EncoderModel(T5Config(**T5_CONFIG)).train()
    probe = torch.nn.Linear(T5_CONFIG["d_model"], len(data.POSITIONS) * sum(demo._ATTRIBUTE_HEADS))
    opt = torch.optim.AdamW([*encoder.parameters(), *probe.parameters()], lr=c["text_lr"], weight_decay=0.01)
    lr_at = demo._cosine(c["text_lr"], 30, c["text_steps"])

    def logits(scenes):
        ids = demo._token_ids(tokenizer, [sc.caption for sc in scenes])
        mask = (ids != tokenizer.pad_token_id).unsqueeze(-1).float()
        pooled = (encoder(ids)[0] * mask).sum(1) / mask.sum(1)
        return probe(pooled).view(len(scenes), len(data.POSITIONS), -1)

    objects = {"t5": encoder, "probe": probe, "opt": opt}
    for step, _ in demo._steps(run, "t5", objects, lambda: c["text_steps"], lr_at, opt):
        scenes = data.scenes(c["text_batch"], seed=demo._data_seed(run, _T5_SEEDS + step), num_objects=None)
        loss = demo._attribute_loss(logits(scenes), demo._evaluator_targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            run.log("t5", step, loss=round(loss.item(), 4), lr=lr_at(step))
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        test = data.prompts(1000, seed=0, num_objects=None)
        accuracy = demo.score(demo.decode(logits(test)), test).overall
    run.log("t5", c["text_steps"], test_accuracy=accuracy)
    return encoder


def sigmas(n: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Training noise levels: logit-normal, then shifted as the pipeline shifts its sampling sigmas for ``tokens``."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    c = SCHEDULER_CONFIG
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    shift = math.exp(c["base_shift"] + slope * (tokens - c["base_image_seq_len"]))
    return shift * u / (1 + (shift - 1) * u)


def train_dit(run: demo.Run, clip, t5, latents, ids, empty_ids) -> FluxTransformer2DModel:
    c = run.config
    torch.manual_seed(c["seed"] + 6)
    model = FluxTransformer2DModel(**FLUX_CONFIG).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=c["dit_lr"], weight_decay=0.01)
    ema = demo._Ema(params, c["ema"])
    objects = {"transformer": model, "opt": opt, "ema": ema}
    side = latents.shape[-1]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(ids.shape[1], 3)
    probe = c["dit_warmup"] // 4

    def total() -> int:
        return c["dit_steps"] or 10**9

    def lr_at(step: int) -> float:
        return demo._cosine(c["dit_lr"], c["dit_warmup"], total())(step)

    timer = None
    for step, gen in demo._steps(run, "dit", objects, total, lr_at, opt):
        timer = timer or (step, time.time())
        idx = torch.randint(len(latents), (c["dit_batch"],), generator=gen)
        x0, tokens = latents[idx], ids[idx].clone()
        tokens[torch.rand(len(idx), generator=gen) < c["uncond_prob"]] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sigmas(len(idx), side * side // 4, gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = FluxPipeline._pack_latents((1 - s) * x0 + s * noise, len(idx), x0.shape[1], side, side)
        target = FluxPipeline._pack_latents(noise - x0, len(idx), x0.shape[1], side, side)
        with torch.no_grad():
            pooled = clip(tokens).pooler_output
            states = t5(tokens)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c["dit_bf16"]):
            pred = model(
                hidden_states=xt,
                timestep=sigma,
                pooled_projections=pooled,
                encoder_hidden_states=states,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0].float()
        loss = (pred - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if step % 25 == 0:
            run.log("dit", step, loss=round(loss.item(), 5), lr=round(opt.param_groups[0]["lr"], 7))
            _record_spent(run)
        if c["dit_steps"] is None and step + 1 - timer[0] == probe:
            per_step = (time.time() - timer[1]) / probe
            left = c["minutes"] * 60 - _spent(run) - demo._EXPORT_RESERVE_S
            c["dit_steps"] = step + 1 + max(int(left / per_step), 0)
            run.save_config()
            run.log("dit", step, per_step_s=round(per_step, 3), dit_steps=c["dit_steps"])
    return model, ema


def _logged_factors(run: demo.Run) -> dict | None:
    """The VAE's shift and scale as the cache stage logged them (a run unpacked from a compact checkpoint has no
    cache, and rebuilding it to export takes minutes), or ``None``."""
    rows = [json.loads(line) for line in (run.folder / "log.jsonl").read_text().splitlines()]
    logged = [row for row in rows if row["stage"] == "cache"]
    return {k: logged[-1][k] for k in ("shift_factor", "scaling_factor")} if logged else None


def _spent(run: demo.Run) -> float:
    return run.spent_before + time.time() - run.start


def _record_spent(run: demo.Run) -> None:
    """Write the time spent so far into the config: a run killed between checkpoints loses at most a log interval."""
    run.config["spent_s"] = round(_spent(run), 1)
    run.save_config()


def export(model_dir: Path, vae, clip, t5, tokenizer, model, factors: dict, size: int) -> None:
    """The pipeline folder ``load_flux_pipeline`` reads, with the side of the images trained on (its default)."""
    vae = AutoencoderKL.from_config(vae.config)
    vae.load_state_dict(load_vae().state_dict())
    vae.register_to_config(**factors)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=model.to(torch.float16),  # half the bytes in the package; loaded in float32 unless asked
    )
    shutil.rmtree(model_dir, ignore_errors=True)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # as train_demo.export: an alias both transformers 4 and 5 know
        index = json.loads((model_dir / "model_index.json").read_text())
        index[name] = ["transformers", "PreTrainedTokenizerFast"]
        (model_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        config_path = model_dir / name / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / SETTINGS_FILE).write_text(json.dumps({"size": size}) + "\n")


def _ema_model(run: demo.Run) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    saved = torch.load(run.folder / "dit.pt", weights_only=False)
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved["ema"]["shadow"]):
            p.copy_(s)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/flux"), help="run folder (resumes if it exists)")
    parser.add_argument("--out", type=Path, required=True, help="where model/ goes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--minutes", type=float, help="time budget over every invocation")
    parser.add_argument("--dit-steps", type=int)
    parser.add_argument(
        "--set", type=_setting, action="append", default=[], metavar="KEY=VALUE", help="any other config value"
    )
    parser.add_argument("--export", action="store_true", help="write the EMA weights as they are now, and stop")
    parser.add_argument(
        "--keep", type=Path, help="write a compact checkpoint (config, log, T5 and EMA weights in fp16) here, and stop"
    )
    parser.add_argument("--resume", type=Path, help="start the run folder from a compact checkpoint (--keep's)")
    parser.add_argument(
        "--init",
        type=Path,
        help="start a new run folder's transformer (step 0, fresh optimizer and budget) and T5 from a compact "
        "checkpoint: the next stage of a resolution curriculum (with --set image_size=256)",
    )
    args = parser.parse_args(argv)
    if args.resume is not None and args.init is not None:
        parser.error("--resume continues a run, --init starts a new stage from one: give one of them")
    if args.resume is not None:
        _unpack(args.resume, args.run)
    torch.set_num_threads(args.threads)
    overrides = {**dict(args.set), "minutes": args.minutes, "dit_steps": args.dit_steps}
    if args.init is not None:
        if (args.run / "config.json").exists():
            raise SystemExit(f"--init: {args.run} exists already; it resumes by itself")
        overrides["init"] = str(args.init)
        _unpack(args.init, args.run, new_stage=True)
    run = demo.Run(args.run, overrides, args.out, defaults=DEFAULTS)
    run.spent_before = run.config["spent_s"]
    tokenizer = demo.make_tokenizer()
    vae = load_vae()
    clip = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder", dtype=torch.float32)
    clip = clip.eval().requires_grad_(False)
    if args.keep is not None:
        _pack(run, args.keep)
        return
    if args.export:
        factors = _logged_factors(run) or build_cache(run, vae, tokenizer)[2]
        t5 = train_t5(run, tokenizer)
        export(run.model_dir, vae, clip, t5, tokenizer, _ema_model(run), factors, run.config["image_size"])
        run.log("export", torch.load(run.folder / "dit.pt", weights_only=False)["step"], folder=str(run.model_dir))
        return
    run.log("start", 0, config=run.config, threads=args.threads)
    try:
        latents, ids, factors = build_cache(run, vae, tokenizer)
        latents = (latents - factors["shift_factor"]) * factors["scaling_factor"]
        t5 = train_t5(run, tokenizer)
        model, ema = train_dit(run, clip, t5, latents, ids, demo._token_ids(tokenizer, [""])[0])
    finally:
        _record_spent(run)
    for p, s in zip(model.parameters(), ema.shadow):
        p.data.copy_(s)
    export(run.model_dir, vae, clip, t5, tokenizer, model.eval(), factors, run.config["image_size"])
    run.log("done", 0, spent_s=run.config["spent_s"])


def _pack(run: demo.Run, folder: Path) -> None:
    """A compact checkpoint a later machine resumes from (the run folder is not committed): config, log, the T5 and
    the transformer's EMA weights in fp16 (12 MB; the optimizer state and the latent cache are made again)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "log.jsonl"):
        shutil.copyfile(run.folder / name, folder / name)
    saved = torch.load(run.folder / "dit.pt", weights_only=False)
    t5 = torch.load(run.folder / "t5.pt", weights_only=False)
    half = {"step": saved["step"], "updates": saved["ema"]["updates"]}
    half["ema"] = [t.half() for t in saved["ema"]["shadow"]]
    half["t5"] = {k: v.half() for k, v in t5["t5"].items()}
    half["probe"] = t5["probe"]
    half["t5_step"] = t5["step"]
    torch.save(half, folder / "checkpoint.pt")
    run.log("keep", saved["step"], folder=str(folder))


def _unpack(folder: Path, run_folder: Path, new_stage: bool = False) -> None:
    """Make a run folder from :func:`_pack`'s checkpoint: the transformer restarts from its EMA weights (and a fresh
    optimizer), the T5 as trained; the latent cache is made again (seeded: the same latents). A ``new_stage`` keeps
    neither the config nor the log and starts the transformer at step 0 with a fresh EMA."""
    if (run_folder / "config.json").exists():
        raise SystemExit(f"--resume: {run_folder} exists already; it resumes by itself")
    run_folder.mkdir(parents=True, exist_ok=new_stage)
    if not new_stage:
        for name in ("config.json", "log.jsonl"):
            shutil.copyfile(folder / name, run_folder / name)
    half = torch.load(folder / "checkpoint.pt", weights_only=False)
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    with torch.no_grad():
        for p, s in zip(model.parameters(), half["ema"]):
            p.copy_(s.float())
    opt = torch.optim.AdamW(model.parameters())
    shadow = [p.detach().clone() for p in model.parameters()]
    ema = {"shadow": shadow, "updates": 0 if new_stage else half["updates"]}
    step = 0 if new_stage else half["step"]
    torch.save({"step": step, "transformer": model.state_dict(), "opt": opt.state_dict(), "ema": ema},
               run_folder / "dit.pt")  # fmt: skip
    t5 = T5EncoderModel(T5Config(**T5_CONFIG))
    t5.load_state_dict({k: v.float() for k, v in half["t5"].items()})
    probe = torch.nn.Linear(T5_CONFIG["d_model"], len(data.POSITIONS) * sum(demo._ATTRIBUTE_HEADS))
    probe.load_state_dict(half["probe"])
    opt = torch.optim.AdamW([*t5.parameters(), *probe.parameters()]).state_dict()
    torch.save({"step": half["t5_step"], "t5": t5.state_dict(), "probe": probe.state_dict(), "opt": opt},
               run_folder / "t5.pt")  # fmt: skip


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or key not in DEFAULTS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {', '.join(DEFAULTS)}; got {text!r}")
    return key, json.loads(value)


if __name__ == "__main__":
    main()
