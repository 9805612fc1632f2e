"""Train the demo model from scratch on CPU and write it into ``agentsd/demo/model/``.

Stages, in order: the evaluator (shipped as ``agentsd/demo/evaluator.safetensors``),
the VAE, a latent cache, the text encoder, then the UNet. Like Stable Diffusion's CLIP,
the text encoder is trained first (to read every object's attributes back from the
caption) and frozen while the UNet learns: trained jointly from scratch, its token
states for "left" and "right" stayed nearly equal, and the UNet never learned where to
draw. Every stage is
seeded; each step draws its data and noise from seeds made from the step number,
so a re-run with the same ``--run`` folder resumes from the last checkpoint and
gives the same batches. Losses go to ``<run>/log.jsonl`` and stdout.

The whole recipe runs in a wall-clock budget (``--minutes``): the UNet's first
steps are timed, and the step count that fits what is left of the budget is fixed
then and recorded in ``<run>/config.json`` (pass ``--unet-steps`` to fix it
yourself). The budget counts from the start of the invocation that fixes it.

    python benchmarks/train_demo.py --run runs/demo --threads 2

``--init FOLDER`` continues from a trained model (``FOLDER/model`` and ``FOLDER/evaluator.safetensors``,
as ``--out`` writes them): the evaluator, the VAE and the text encoder are taken as they are, the
latent cache is made again with that VAE, and the UNet starts from its weights (its EMA too):

    python benchmarks/train_demo.py --run runs/more --init agentsd/demo --minutes 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from agentsd.demo import data
from agentsd.demo.evaluator import HEADS as _ATTRIBUTE_HEADS
from agentsd.demo.evaluator import Evaluator, decode, score
from agentsd.demo.pipeline import MODEL_DIR

MAX_TOKENS = 20  # longest caption: 15 words + bos + eos
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),  # factor-4 latent: 128² RGB -> 32² x 4
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=data.IMAGE_SIZE,
    mid_block_add_attention=False,
)
TEXT_CONFIG = dict(
    vocab_size=len(SPECIAL) + len(data.vocabulary()),
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
UNET_CONFIG = dict(
    sample_size=data.IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    # A miniature of SD 1.5's layout: self-attention on the 32² = 1,024-token top level (where agentsd
    # acts) and on 16², none on 8² but in the mid block. The top level's two transformer layers give its
    # self-attention about the share of UNet time it has in SD 1.5 at 512² (its "ceiling" >= 1.25x).
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    transformer_layers_per_block=(2, 1, 1),
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
    attention_head_dim=(2, 4, 4),  # diffusers' legacy name: heads per level, 32 channels each
    norm_num_groups=32,
)
SCHEDULER_CONFIG = dict(  # Stable Diffusion 1.5's
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
DEFAULTS = dict(
    seed=0,
    eval_steps=600,
    eval_batch=64,
    eval_lr=2e-3,
    vae_steps=1500,
    vae_batch=16,
    vae_crop=64,
    vae_lr=2e-3,
    vae_kl=1e-4,
    vae_object_weight=9.0,
    cache_size=24576,
    text_steps=300,
    text_batch=256,
    text_lr=2e-3,
    unet_batch=24,
    unet_lr=1e-3,
    unet_warmup=200,
    unet_bf16=True,
    minutes=110.0,
    unet_steps=None,
    ema=0.999,
    uncond_prob=0.1,
    min_snr=5.0,
    init=None,
    test_n=1000,  # held-out scenes each stage is scored on at its end (the VAE's reconstructions: half as many)
)
# Disjoint seed ranges of the generator's training stream, one per stage (run seed k adds k * 10**8).
_EVAL_SEEDS, _VAE_SEEDS, _CACHE_SEEDS, _TEXT_SEEDS = 1_000_000, 2_000_000, 3_000_000, 4_000_000
# what a resumed run folder may be given anew (the rest of its config stays as it started)
BUDGET = {"minutes", "unet_steps", "dit_steps"}
_CHECKPOINT_EVERY_S = 120
_EXPORT_RESERVE_S = 60


class Run:
    """The run folder: config, JSON-lines log, and per-stage checkpoints."""

    def __init__(self, folder: Path, overrides: dict, out: Path = MODEL_DIR.parent, defaults: dict = DEFAULTS):
        self.folder, self.out = folder, out
        self.evaluator_weights, self.model_dir = out / "evaluator.safetensors", out / "model"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.json"
        self.start = time.time()
        if path.exists():  # resuming: the recorded config, settings added since at their defaults
            self.config = {**defaults, **json.loads(path.read_text())}
            given = {k: v for k, v in overrides.items() if v is not None and self.config.get(k) != v}
            refused = [f"{k}={v!r} (it ran with {self.config.get(k)!r})" for k, v in given.items() if k not in BUDGET]
            if refused:
                raise SystemExit(
                    f"{folder} resumes with the settings it started with; {', '.join(refused)} would change them "
                    f"(only {', '.join(sorted(BUDGET))} may): start a new run folder"
                )
            fixed = [k for k in ("unet_steps", "dit_steps") if self.config.get(k) is not None and k not in given]
            if "minutes" in given and fixed:
                key = fixed[0]
                raise SystemExit(
                    f"{folder}: its step count is fixed ({key}={self.config[key]}), so minutes={given['minutes']} "
                    f"alone would change nothing: give the step count (--{key.replace('_', '-')}) too"
                )
            if given:  # another budget or step count: the steps left and the lr schedule follow it
                self.config.update(given)
                self.save_config()
                self.log("budget", 0, **given)
        else:
            self.config = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
            self.save_config()

    def adopt_threads(self) -> None:
        """Follow ``<run>/threads`` if it exists: a long run yields a core while other work runs, then takes it back."""
        path = self.folder / "threads"
        if path.exists():
            threads = int(path.read_text().strip() or 0)
            if threads > 0 and threads != torch.get_num_threads():
                torch.set_num_threads(threads)
                self.log("threads", 0, threads=threads)

    def save_config(self) -> None:
        (self.folder / "config.json").write_text(json.dumps(self.config, indent=1))

    def log(self, stage: str, step: int, **values) -> None:
        row = {"stage": stage, "step": step, "time": round(time.time() - self.start, 1), **values}
        with open(self.folder / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def load(self, stage: str, objects: dict) -> int:
        """Restore ``objects`` (anything with ``load_state_dict``) from the stage's checkpoint.

        Returns the step to go on from.
        """
        path = self.folder / f"{stage}.pt"
        if not path.exists():
            return 0
        saved = torch.load(path, weights_only=False)
        for name, obj in objects.items():
            obj.load_state_dict(saved[name])
        return saved["step"]

    def save(self, stage: str, step: int, objects: dict) -> None:
        path = self.folder / f"{stage}.pt"
        torch.save({"step": step, **{k: v.state_dict() for k, v in objects.items()}}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a kill mid-write leaves the old checkpoint intact


def _data_seed(run: Run, seed: int) -> int:
    return run.config["seed"] * 10**8 + seed


def _seed(run: Run, stage: str, step: int) -> int:
    """A seed of its own for each (run seed, stage, step)."""
    return int(np.random.SeedSequence([run.config["seed"], zlib.crc32(stage.encode()), step]).generate_state(1)[0])


def _steps(run: Run, stage: str, objects: dict, total, lr_at, optimizer):
    """Yield ``(step, generator)`` for the steps left, setting the lr and checkpointing as it goes.

    ``total()`` is read every step, so a stage may fix its length after it has begun.
    """
    step = run.load(stage, objects)
    last_save = time.time()
    while step < total():
        run.adopt_threads()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        yield step, torch.Generator().manual_seed(_seed(run, stage, step))
        step += 1
        if step == total() or time.time() - last_save > _CHECKPOINT_EVERY_S:
            run.save(stage, step, objects)
            last_save = time.time()


def _cosine(lr: float, warmup: int, total: int):
    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))))

    return at


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Mild contrast, brightness, blur and noise so the evaluator also reads imperfect (generated) images.
    x = images.float() / 255
    n = x.shape[0]
    x = x * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) + 0.1 * (
        torch.rand(n, 1, 1, 1, generator=gen) - 0.5
    )
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, blurred, x)
    x = x + 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _evaluator_targets(scenes: list[data.Scene]) -> torch.Tensor:
    """``(N, 5, 4)``: per position, presence and the shape, colour, size indices (-100 where empty)."""
    positions, tables = list(data.POSITIONS), (list(data.SHAPES), list(data.COLOURS), list(data.SIZES))
    out = torch.full((len(scenes), len(positions), 4), -100, dtype=torch.long)
    out[..., 0] = 0
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            p = positions.index(o.position)
            out[i, p] = torch.tensor([1, *(t.index(v) for t, v in zip(tables, (o.shape, o.colour, o.size)))])
    return out


def train_evaluator(run: Run) -> None:
    c = run.config
    torch.manual_seed(c["seed"])
    model = Evaluator().train()
    opt = torch.optim.AdamW(model.parameters(), lr=c["eval_lr"], weight_decay=1e-4)
    objects = {"model": model, "opt": opt}
    lr_at = _cosine(c["eval_lr"], 50, c["eval_steps"])
    for step, gen in _steps(run, "evaluator", objects, lambda: c["eval_steps"], lr_at, opt):
        batch = data.sample(c["eval_batch"], seed=_data_seed(run, _EVAL_SEEDS + step), num_objects=None)
        loss = _attribute_loss(model.logits(_augment(batch.images, gen)), _evaluator_targets(batch.scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            run.log("evaluator", step, loss=round(loss.item(), 4), lr=lr_at(step))
    model.eval()
    run.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run.evaluator_weights))
    test = data.sample(c["test_n"], seed=0, num_objects=None, split="test")
    scores = Evaluator.load(run.evaluator_weights).accuracy(test.images, test.scenes)
    run.log("evaluator", c["eval_steps"], test_accuracy=scores.overall, scores=scores.__dict__)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def _object_weight(images: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weight ``1 + weight`` on objects, 1 on background, as ``(N, 1, H, W)``.

    Objects cover a few percent of an image, so an unweighted loss learns the grey
    background long before shapes and colours. Backgrounds are grey and no brighter
    than 115; every object colour is saturated or brighter.
    """
    x = images.float()
    hi, lo = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    return 1 + weight * ((hi > 120) | (hi - lo > 30)).float()


def _crop(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``size``² window of each image (the VAE is convolutional: crops train it at a fraction of the cost)."""
    side = images.shape[-1]
    if size >= side:
        return images
    offsets = torch.randint(0, side - size + 1, (len(images), 2), generator=gen).tolist()
    return torch.stack([im[:, y : y + size, x : x + size] for im, (y, x) in zip(images, offsets)])


def train_vae(run: Run) -> AutoencoderKL:
    """Train the VAE on crops (object-weighted L1 + L2, edge term, small KL); set its scaling factor from latents."""
    c = run.config
    torch.manual_seed(c["seed"] + 1)
    vae = AutoencoderKL(**VAE_CONFIG).train()
    with torch.no_grad():
        # Start with a small posterior std: with the default (std 1) the sampled latent drowns
        # the mean and the first few hundred steps learn nothing but to shrink it.
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=c["vae_lr"], weight_decay=0.0)
    lr_at = _cosine(c["vae_lr"], 50, c["vae_steps"])
    for step, gen in _steps(run, "vae", {"vae": vae, "opt": opt}, lambda: c["vae_steps"], lr_at, opt):
        images = data.sample(c["vae_batch"], seed=_data_seed(run, _VAE_SEEDS + step), num_objects=None).images
        images = _crop(images, c["vae_crop"], gen)
        x, w = _to_unit(images), _object_weight(images, c["vae_object_weight"])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        d = vae.decode(z).sample - x
        rec = (w * (d.abs() + d.pow(2))).mean() / w.mean()
        edges = (d[..., 1:, :] - d[..., :-1, :]).abs().mean() + (d[..., 1:] - d[..., :-1]).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + edges + c["vae_kl"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            run.log(
                "vae",
                step,
                rec=round(rec.item(), 5),
                edges=round(edges.item(), 5),
                kl=round(kl.item(), 3),
                lr=lr_at(step),
            )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        test = data.sample(c["test_n"] // 2, seed=0, num_objects=None, split="test")
        z = vae.encode(_to_unit(test.images)).latent_dist.mean
        decoded = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    vae.register_to_config(scaling_factor=round(1 / z.std().item(), 5))
    # Can the evaluator read reconstructions?
    scores = Evaluator.load(run.evaluator_weights).accuracy(decoded, test.scenes)
    l1 = (decoded.float() - test.images.float()).abs().mean().item() / 255
    run.log(
        "vae",
        c["vae_steps"],
        recon_l1=round(l1, 5),
        recon_accuracy=scores.overall,
        scores=scores.__dict__,
        scaling_factor=vae.config.scaling_factor,
    )
    return vae


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption vocabulary, framing each caption as ``<bos> ... <eos>``."""
    vocab = {w: i for i, w in enumerate(SPECIAL + data.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def build_cache(run: Run, vae: AutoencoderKL, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latent means and token ids of ``cache_size`` training images (made once, kept in the run folder)."""
    path = run.folder / "cache.pt"
    if path.exists():
        cache = torch.load(path)
        return cache["latents"], cache["ids"]
    n, chunk = run.config["cache_size"], 256
    latents, ids = [], []
    with torch.no_grad():
        for k in range(math.ceil(n / chunk)):
            batch = data.sample(min(chunk, n - k * chunk), seed=_data_seed(run, _CACHE_SEEDS + k), num_objects=None)
            latents.append(vae.encode(_to_unit(batch.images)).latent_dist.mean * vae.config.scaling_factor)
            ids.append(_token_ids(tokenizer, batch.captions))
    latents, ids = torch.cat(latents), torch.cat(ids)
    torch.save({"latents": latents, "ids": ids}, path)
    run.log("cache", n, latent_std=round(latents.std().item(), 4))
    return latents, ids


def _attribute_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Presence (BCE) and shape/colour/size (CE) per position; ``target`` from :func:`_evaluator_targets`."""
    present, *attrs = logits.split(_ATTRIBUTE_HEADS, dim=-1)
    loss = F.binary_cross_entropy_with_logits(present[..., 0], target[..., 0].float())
    for k, attr in enumerate(attrs, start=1):
        loss = loss + F.cross_entropy(attr.flatten(0, 1), target[..., k].flatten(), ignore_index=-100)
    return loss


def train_text_encoder(run: Run, tokenizer) -> CLIPTextModel:
    """Train the text encoder to state each object's attributes (mean of its token states → linear probe).

    Captions only, no images: seconds of work. Returns the encoder, frozen.
    """
    c = run.config
    torch.manual_seed(c["seed"] + 3)
    encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).train()
    probe = torch.nn.Linear(TEXT_CONFIG["hidden_size"], len(data.POSITIONS) * sum(_ATTRIBUTE_HEADS))
    params = [*encoder.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=c["text_lr"], weight_decay=0.01)
    lr_at = _cosine(c["text_lr"], 30, c["text_steps"])
    objects = {"text_encoder": encoder, "probe": probe, "opt": opt}

    def logits(scenes: list[data.Scene]) -> torch.Tensor:
        ids = _token_ids(tokenizer, [sc.caption for sc in scenes])
        mask = (ids != tokenizer.pad_token_id).unsqueeze(-1).float()
        pooled = (encoder(ids)[0] * mask).sum(1) / mask.sum(1)
        return probe(pooled).view(len(scenes), len(data.POSITIONS), -1)

    for step, _ in _steps(run, "text", objects, lambda: c["text_steps"], lr_at, opt):
        scenes = data.scenes(c["text_batch"], seed=_data_seed(run, _TEXT_SEEDS + step), num_objects=None, split="train")
        loss = _attribute_loss(logits(scenes), _evaluator_targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            run.log("text", step, loss=round(loss.item(), 4), lr=lr_at(step))
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        test = data.prompts(c["test_n"], seed=0, num_objects=None)
        scores = score(decode(logits(test)), test)  # the evaluator's scoring, on the probe's readings
    run.log("text", c["text_steps"], test_accuracy=scores.overall)
    return encoder


class _Ema:
    """Exponential moving average of a list of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.updates = state["shadow"], state["updates"]


def train_unet(run: Run, text_encoder, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor):
    """Train the UNet on the frozen text encoder (epsilon loss, min-SNR weighting, caption dropout for CFG)."""
    c = run.config
    torch.manual_seed(c["seed"] + 2)
    if c["init"]:
        unet = UNet2DConditionModel.from_pretrained(Path(c["init"]) / "model" / "unet", dtype=torch.float32)
        mismatched = {k: v for k, v in UNET_CONFIG.items() if _listed(unet.config[k]) != _listed(v)}
        if mismatched:
            raise ValueError(f"--init UNet differs from this recipe's UNET_CONFIG in {sorted(mismatched)}")
        unet.train()
    else:
        unet = UNet2DConditionModel(**UNET_CONFIG).train()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=c["unet_lr"], weight_decay=0.01)
    ema = _Ema(params, c["ema"])
    objects = {"unet": unet, "opt": opt, "ema": ema}
    alphas = PNDMScheduler(**SCHEDULER_CONFIG).alphas_cumprod
    probe = c["unet_warmup"] // 4  # timed steps that fix the step count (within warm-up, so the lr is unaffected)

    def total() -> int:
        return c["unet_steps"] or 10**9

    def lr_at(step: int) -> float:
        return _cosine(c["unet_lr"], c["unet_warmup"], total())(step)

    timer = None
    for step, gen in _steps(run, "unet", objects, total, lr_at, opt):
        timer = timer or (step, time.time())
        idx = torch.randint(len(latents), (c["unet_batch"],), generator=gen)
        z0, tokens = latents[idx], ids[idx].clone()
        tokens[torch.rand(len(idx), generator=gen) < c["uncond_prob"]] = empty_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            states = text_encoder(tokens)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c["unet_bf16"]):  # faster where CPUs have bf16 units
            pred = unet(zt, t, states).sample.float()
        snr = (a / (1 - a)).flatten()
        weight = snr.clamp(max=c["min_snr"]) / snr  # min-SNR-gamma: focus on the noisy steps that set the layout
        loss = (weight * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if step % 25 == 0:
            run.log("unet", step, loss=round(loss.item(), 5), lr=round(opt.param_groups[0]["lr"], 7))
        if c["unet_steps"] is None and step + 1 - timer[0] == probe:
            per_step = (time.time() - timer[1]) / probe
            left = c["minutes"] * 60 - (time.time() - run.start) - _EXPORT_RESERVE_S
            c["unet_steps"] = step + 1 + max(int(left / per_step), 0)
            run.save_config()
            run.log("unet", step, per_step_s=round(per_step, 3), unet_steps=c["unet_steps"])
    for p, s in zip(params, ema.shadow):
        p.data.copy_(s)
    return unet.eval()


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def reuse(run: Run) -> tuple[AutoencoderKL, CLIPTextModel]:
    """``--init``: the evaluator, VAE and text encoder of a trained model, as they are."""
    init = Path(run.config["init"])
    if not (init / "evaluator.safetensors").is_file() or not (init / "model" / "unet").is_dir():
        raise FileNotFoundError(f"--init needs evaluator.safetensors and model/ in {init}")
    run.out.mkdir(parents=True, exist_ok=True)
    if init.resolve() != run.out.resolve():
        shutil.copyfile(init / "evaluator.safetensors", run.evaluator_weights)
    vae = AutoencoderKL.from_pretrained(init / "model" / "vae", dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(init / "model" / "text_encoder", dtype=torch.float32)
    run.log("init", 0, folder=str(init))
    return vae.requires_grad_(False), text_encoder.eval().requires_grad_(False)


def export(model_dir: Path, vae, text_encoder, tokenizer, unet) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    shutil.rmtree(model_dir, ignore_errors=True)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # transformers 5 records the tokenizer as "TokenizersBackend", a name 4.x lacks; both know this alias.
    for path, key in (
        (model_dir / "model_index.json", "tokenizer"),
        (model_dir / "tokenizer/tokenizer_config.json", None),
    ):
        config = json.loads(path.read_text())
        if key:
            config[key] = ["transformers", "PreTrainedTokenizerFast"]
        else:
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2) + "\n")


def export_now(run: Run, tokenizer) -> None:
    """``--export``: the model as the UNet's checkpoint holds it (EMA weights), mid-training; for ``--init`` runs."""
    if not run.config["init"] or not (run.folder / "unet.pt").exists():
        raise SystemExit("--export needs a run that continues a model (--init) and has a UNet checkpoint")
    vae, text_encoder = reuse(run)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    saved = torch.load(run.folder / "unet.pt", weights_only=False)
    with torch.no_grad():
        for p, s in zip(unet.parameters(), saved["ema"]["shadow"]):
            p.copy_(s)
    export(run.model_dir, vae, text_encoder, tokenizer, unet.eval())
    run.log("export", saved["step"], folder=str(run.model_dir))


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or key not in DEFAULTS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {', '.join(DEFAULTS)}; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a number") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (resumes if it exists)")
    parser.add_argument("--out", type=Path, default=MODEL_DIR.parent, help="where model/ and the evaluator go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--minutes", type=float, help="wall-clock budget of the whole recipe")
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--init", type=Path, help="continue from a trained model's folder (model/, evaluator)")
    parser.add_argument(
        "--set", type=_setting, action="append", default=[], metavar="KEY=VALUE", help="any other config value"
    )
    parser.add_argument(
        "--export", action="store_true", help="write the UNet's EMA weights as they are now into --out, and stop"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {**dict(args.set), "seed": args.seed, "minutes": args.minutes, "unet_steps": args.unet_steps}
    overrides["init"] = None if args.init is None else str(args.init)
    run = Run(args.run, overrides, args.out)
    tokenizer = make_tokenizer()
    if args.export:
        export_now(run, tokenizer)
        return
    run.log("start", 0, config=run.config, threads=args.threads)
    if run.config["init"]:
        vae, text_encoder = reuse(run)
        latents, ids = build_cache(run, vae, tokenizer)
    else:
        train_evaluator(run)
        vae = train_vae(run)
        latents, ids = build_cache(run, vae, tokenizer)
        text_encoder = train_text_encoder(run, tokenizer)
    unet = train_unet(run, text_encoder, latents, ids, _token_ids(tokenizer, [""])[0])
    export(run.model_dir, vae, text_encoder, tokenizer, unet)
    run.log("done", 0, wall_s=round(time.time() - run.start, 1))


if __name__ == "__main__":
    main()
