import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from agentsd.bench.runs import letter_tokenizer

# `agentsd calibrate` results of the machine running the tests must not change what the tests see
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="agentsd-test-cache-")

CROSS_DIM = 32
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` or ``benchmarks/studies/<name>.py`` (not a package) as a module."""
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(
        name, path if path.exists() else BENCHMARKS / "studies" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_graphs(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` as the tests use it: dynamo's graphs (breaks, one per phase, no recompiles) and AOT
    autograd's trace of them, run eagerly. Inductor's code generation adds minutes on a CPU and nothing agentsd
    controls; the GPU suite compiles with inductor on the card (``agentsd bench suite``)."""
    return torch.compile(module, backend="aot_eager")


def tiny_unet(layout: str = "sd", seed: int = 0) -> UNet2DConditionModel:
    """A few-hundred-kB UNet with the block layout of SD 1.x (attention at the top level) or SDXL (none there)."""
    torch.manual_seed(seed)
    if layout == "sd":
        blocks = dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    elif layout == "sdxl":
        blocks = dict(
            block_out_channels=(32, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    else:
        raise ValueError(layout)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        **blocks,
    ).eval()


def unet_inputs(batch=2, height=16, width=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=g).to(dtype)
    context = torch.randn(batch, 7, CROSS_DIM, generator=g).to(dtype)
    return sample, context


@pytest.fixture
def unet():
    return tiny_unet("sd")


def char_tokenizer(folder, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer over single letters, no merges (the one the whole-run benchmark builds)."""
    return letter_tokenizer(folder, max_length)


def tiny_pipeline(tmp_path) -> StableDiffusionPipeline:
    """SD 1.x pipeline from configs: char-level tokenizer, 2-layer CLIP, 2-level VAE, the tiny SD UNet, PNDM."""
    tokenizer = char_tokenizer(tmp_path)
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(tokenizer)),
        tokenizer=tokenizer,
        unet=tiny_unet("sd"),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vae(**config) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def _text_encoder_config(tokenizer, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=CROSS_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kwargs,
    )


def _sdxl_unet(cross_attention_dim: int, time_ids: int, **layout) -> UNet2DConditionModel:
    """A tiny UNet with SDXL's conditioning: pooled text plus ``time_ids`` size (or aesthetic) terms."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=CROSS_DIM + time_ids * 8,
        norm_num_groups=8,
        **layout,
    ).eval()


def tiny_sdxl_pipeline(tmp_path) -> StableDiffusionXLPipeline:
    """SDXL pipeline from configs: two text encoders, size conditioning, no attention at the top level."""
    tokenizer = char_tokenizer(tmp_path)
    unet = _sdxl_unet(
        2 * CROSS_DIM,
        6,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(tokenizer, projection_dim=CROSS_DIM)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        force_zeros_for_empty_prompt=False,
    )


def tiny_sdxl_refiner(tmp_path) -> StableDiffusionXLImg2ImgPipeline:
    """The SDXL refiner's layout: four levels, self-attention on the middle two only, one text encoder
    (text_encoder_2's width), aesthetic-score conditioning (five time ids)."""
    tokenizer = char_tokenizer(tmp_path)
    unet = _sdxl_unet(
        CROSS_DIM,
        5,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        attention_head_dim=(2, 4, 8, 8),
    )
    return StableDiffusionXLImg2ImgPipeline(
        vae=_tiny_vae(),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(tokenizer, projection_dim=CROSS_DIM)),
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
