import json
import string

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTokenizer

CROSS_DIM = 32


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
    """A CLIP tokenizer written here: single letters (with and without the end-of-word mark), no merges."""
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
