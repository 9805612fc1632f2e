"""The trainable agent attention of the paper's backbones (Agent-DeiT/PVT/Swin): pure torch, no diffusers.

Tokens ``x`` (B × N × C) are ``P`` prefix tokens (CLS, registers) followed by an h × w patch grid.
Per head (dim d, scale s = d^-0.5), with agents A pooled from the patch queries to p × p = n tokens:

    V_A = softmax(A Kᵀ s + B1) V        (n × d: agents gather from all N tokens)
    O   = softmax(Q Aᵀ s + B2) V_A      (N × d: every token reads from the agents)

plus a depthwise 3×3 convolution of the patch tokens' V added to their output, then ``proj``.
B1 (agent bias, n × N) and B2 (broadcast bias, N × n) are learned: 7 × 7 tables interpolated to
the grid, height and width terms, and one column (row) per prefix token. Both softmax products
run through ``scaled_dot_product_attention`` with the biases as additive masks. Parameter names
follow the official Agent-DeiT code, so its checkpoints load with ``strict=True``.

``AgentSD`` (the rest of this package) is the training-free special case: agents made by token
merging, no biases, no convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AgentAttention", "Attention", "Block", "ViT", "agentify"]

_TABLE = 7  # side of the interpolated bias tables


class AgentAttention(nn.Module):
    """Agent attention with agent bias and depthwise convolution, a drop-in for a ViT block's ``attn``.

    Important args:
        dim: channels C.
        num_heads: heads H.
        agent_num: agents n, a square (49 = 7 × 7).
        grid_size: the patch grid (h, w) the height/width biases are sized for; other grids interpolate them.

    Args to tinker with:
        qkv_bias, attn_drop, proj_drop: as in timm's ``Attention``.
        num_prefix_tokens: tokens before the patch grid (1 for a CLS token, 0 for none).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        *,
        agent_num: int = 49,
        grid_size: tuple[int, int] | int = 14,
        num_prefix_tokens: int = 1,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        pool = math.isqrt(agent_num)
        if agent_num < 1 or pool * pool != agent_num:
            raise ValueError(f"agent_num must be a square (49 = 7 x 7), got {agent_num}")
        if qk_norm:
            raise ValueError("qk_norm is not part of agent attention")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.num_heads, self.agent_num, self.pool_size = num_heads, agent_num, pool
        self.grid_size, self.num_prefix_tokens = (h, w), num_prefix_tokens
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        H, n, P = num_heads, agent_num, num_prefix_tokens
        self.an_bias = nn.Parameter(torch.zeros(H, n, _TABLE, _TABLE))
        self.na_bias = nn.Parameter(torch.zeros(H, n, _TABLE, _TABLE))
        self.ah_bias = nn.Parameter(torch.zeros(1, H, n, h, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, H, n, 1, w))
        self.ha_bias = nn.Parameter(torch.zeros(1, H, h, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, H, 1, w, n))
        if P:
            self.ac_bias = nn.Parameter(torch.zeros(1, H, n, P))
            self.ca_bias = nn.Parameter(torch.zeros(1, H, P, n))
        for bias in self.biases():
            nn.init.trunc_normal_(bias, std=0.02)

    def biases(self) -> list[nn.Parameter]:
        names = ["an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"]
        return [getattr(self, name) for name in names + (["ac_bias", "ca_bias"] if self.num_prefix_tokens else [])]

    def grid(self, num_patches: int) -> tuple[int, int]:
        """The (h, w) grid of ``num_patches`` tokens: the configured grid if it fits, else a square one."""
        h, w = self.grid_size
        if h * w == num_patches:
            return h, w
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patch tokens fit neither the {h}x{w} grid nor a square one; pass grid=(h, w)"
            )
        return side, side

    def attention_biases(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B1 ``(1, H, n, P + h·w)`` and B2 ``(1, H, P + h·w, n)`` for an h × w grid."""
        H, n, P = self.num_heads, self.agent_num, self.num_prefix_tokens
        table1 = F.interpolate(self.an_bias, size=(h, w), mode="bilinear").reshape(1, H, n, h * w)
        table2 = F.interpolate(self.na_bias, size=(h, w), mode="bilinear").reshape(1, H, n, h * w).transpose(2, 3)
        ah, aw, ha, wa = self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias
        if (h, w) != self.grid_size:  # sized for another grid: interpolate along height and width
            ah = F.interpolate(ah.flatten(0, 2)[:, None], size=(h, 1), mode="bilinear").reshape(1, H, n, h, 1)
            aw = F.interpolate(aw.flatten(0, 2)[:, None], size=(1, w), mode="bilinear").reshape(1, H, n, 1, w)
            ha = F.interpolate(ha.permute(0, 1, 4, 2, 3).flatten(0, 2)[:, None], size=(h, 1), mode="bilinear")
            ha = ha.reshape(1, H, n, h, 1).permute(0, 1, 3, 4, 2)
            wa = F.interpolate(wa.permute(0, 1, 4, 2, 3).flatten(0, 2)[:, None], size=(1, w), mode="bilinear")
            wa = wa.reshape(1, H, n, 1, w).permute(0, 1, 3, 4, 2)
        bias1 = table1 + (ah + aw).reshape(1, H, n, h * w)
        bias2 = table2 + (ha + wa).reshape(1, H, h * w, n)
        if P:
            bias1 = torch.cat([self.ac_bias, bias1], dim=-1)
            bias2 = torch.cat([self.ca_bias, bias2], dim=-2)
        return bias1, bias2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, grid=None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("AgentAttention takes no attn_mask: every token attends through the agents")
        B, N, C = x.shape
        H, P = self.num_heads, self.num_prefix_tokens
        h, w = grid if grid is not None else self.grid(N - P)
        if h * w != N - P:
            raise ValueError(f"grid {h}x{w} does not hold the {N - P} patch tokens")
        q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each B, H, N, d
        patches = q[:, :, P:].transpose(1, 2).reshape(B, h, w, C).permute(0, 3, 1, 2)
        agents = F.adaptive_avg_pool2d(patches, self.pool_size).reshape(B, H, C // H, -1).transpose(2, 3)
        bias1, bias2 = self.attention_biases(h, w)
        drop = self.attn_drop if self.training else 0.0
        bias1, bias2 = bias1.to(q.dtype), bias2.to(q.dtype)
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=bias1, dropout_p=drop, scale=self.scale)
        out = F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=bias2, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        v_grid = v[:, :, P:].transpose(1, 2).reshape(B, h, w, C).permute(0, 3, 1, 2)
        local = self.dwc(v_grid).permute(0, 2, 3, 1).reshape(B, h * w, C)
        out = torch.cat([out[:, :P], out[:, P:] + local], dim=1)
        return self.proj_drop(self.proj(out))


class Attention(nn.Module):
    """Plain multi-head softmax attention with timm's names (``qkv``, ``proj``): the baseline."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """A pre-norm transformer block with timm's layout: ``norm1``, ``attn``, ``norm2``, ``mlp``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small DeiT-style ViT (CLS token, learned position embedding) for when timm is not installed.

    Position embeddings are interpolated for other image sizes, so throughput can be measured at any size.
    """

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 8,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.patch_size, self.num_prefix_tokens = patch_size, 1
        self.grid_size = (img_size // patch_size,) * 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos_cls, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) != self.grid_size:
            grid = pos.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(grid, size=(h, w), mode="bicubic").flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1) + pos_cls, x + pos], dim=1)
        for block in self.blocks:
            x = _call_block(block, x, (h, w))
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images)[:, 0])


def _call_block(block: Block, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if isinstance(block.attn, AgentAttention):
        x = x + block.attn(block.norm1(x), grid=grid)
        return x + block.mlp(block.norm2(x))
    return block(x)


def agentify(model: nn.Module, agent_num: int = 49, grid_size=None) -> nn.Module:
    """Swap the attention of every ViT block (a module with ``.attn`` holding ``qkv`` and ``proj``) for
    :class:`AgentAttention`, keeping the ``qkv``/``proj`` weights; biases and DWC start fresh.

    ``grid_size`` defaults to the model's patch grid (``model.grid_size`` or ``model.patch_embed.grid_size``).
    Returns ``model``, changed in place.
    """
    if grid_size is None:
        grid_size = getattr(model, "grid_size", None) or getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid_size is None:
        raise ValueError("cannot tell the model's patch grid: pass grid_size=(h, w)")
    prefix = getattr(model, "num_prefix_tokens", 1)
    swapped = 0
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, AgentAttention) or not all(hasattr(attn, name) for name in ("qkv", "proj")):
            continue
        dim = attn.qkv.in_features
        agent = AgentAttention(
            dim,
            attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            agent_num=agent_num,
            grid_size=grid_size,
            num_prefix_tokens=prefix,
        ).to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        agent.qkv.load_state_dict(attn.qkv.state_dict())
        agent.proj.load_state_dict(attn.proj.state_dict())
        module.attn = agent
        swapped += 1
    if not swapped:
        raise ValueError("no attention with qkv and proj found: expected timm-style ViT blocks")
    return model
