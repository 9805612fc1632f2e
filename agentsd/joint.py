"""Agent attention in SD 3's joint (MMDiT) attention.

A ``JointTransformerBlock`` attends over the image tokens X (N, on the h×w patch grid) and the
text tokens T (M) at once. With agents A (ToMe-merged image tokens, matched on the patch grid by
the block's image input), per head with ``s = attn.scale``:

- the agents gather from every key: ``V_A = softmax(Q_A [K_X; K_T]ᵀ s) [V_X; V_T]``;
- the image queries read the agents: ``O_X = softmax(Q_X Q_Aᵀ s^k_scale2) V_A + k_shortcut · V_X``;
- the text queries attend exactly: ``O_T = softmax(Q_T [K_X; K_T]ᵀ s) [V_X; V_T]``.

Without agents (a ToMe phase) every query attends over ``[X'; T]``: the image tokens merged
before the projections (``tokens="merged"``, unmerged after) or only their keys and values
(``tokens="all"``). SD 3.5's image-only ``attn2`` follows the UNet formulas
(:class:`~agentsd.attention.AgentAttnProcessor`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AgentAttnProcessor, image_heads

__all__ = ["JointAgentProcessor", "joint_attention"]


class JointAgentProcessor(AgentAttnProcessor):
    """Replaces ``attn`` and ``attn2`` of a ``JointTransformerBlock``; falls back to ``original`` wherever it does
    not apply (IP-Adapter's extra inputs, a mask, a block or step the schedule leaves alone)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None:  # SD 3.5's attn2: image self-attention
            return super().__call__(attn, hidden_states, None, attention_mask, **kwargs)
        metric, self.block_input = self.block_input, None
        plan = None if kwargs else self._plan(attn, hidden_states, metric, None, attention_mask)
        if plan is None:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        h, w, band, phase, r = plan
        config = self.state.config
        tokens = None
        if phase.tokens == "merged":
            tokens, agents = self._token_merges(hidden_states, metric, h, w, band, phase, r)
            image, keys_of = tokens(hidden_states), None
        else:
            image = hidden_states
            agents, keys_of = self._all_groups(hidden_states, metric, h, w, band, phase)
        out, context = joint_attention(
            attn,
            image,
            encoder_hidden_states,
            agents,
            keys_of=keys_of,
            k_scale2=config.k_scale2,
            k_shortcut=config.k_shortcut,
            upcast=config.attn_precision == "fp32",
        )
        return (out if tokens is None else tokens.unmerge(out)), context


def joint_attention(
    attn,
    image: torch.Tensor,
    context: torch.Tensor,
    agents,
    *,
    keys_of=None,
    k_scale2: float,
    k_shortcut: float,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of ``image`` (B×N×C) and ``context`` (B×M×C) through ``attn``'s projections, via agents when
    given; returns the image and text outputs after ``to_out`` / ``to_add_out``.

    ``agents``: ``None``, agent tokens ``(B, n, C)`` (projected by ``to_q``) or a function that averages groups of
    the projected image queries. ``keys_of``: a function that merges the image keys and values alone.
    """
    B = image.shape[0]
    query, key, value, agent, split_heads = image_heads(attn, image, agents, keys_of)
    heads, head_dim = query.shape[1], query.shape[-1]

    if getattr(attn, "fused_projections", False) and getattr(attn, "to_added_qkv", None) is not None:
        text_qkv = attn.to_added_qkv(context).chunk(3, dim=-1)
    else:
        text_qkv = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
    text_query, text_key, text_value = (split_heads(t) for t in text_qkv)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)

    dtype = query.dtype
    if upcast:
        query, value, text_query = query.float(), value.float(), text_query.float()
        key, text_key, text_value = key.float(), text_key.float(), text_value.float()
        agent = None if agent is None else agent.float()
    keys = torch.cat([key, text_key], dim=2)
    values = torch.cat([value, text_value], dim=2)
    scale = attn.scale
    if agent is None:
        out = F.scaled_dot_product_attention(torch.cat([query, text_query], dim=2), keys, values, scale=scale)
        out, text_out = out[:, :, : query.shape[2]], out[:, :, query.shape[2] :]
    else:
        agent_value = F.scaled_dot_product_attention(agent, keys, values, scale=scale)
        out = F.scaled_dot_product_attention(query, agent, agent_value, scale=scale**k_scale2)
        out = torch.add(out, value, alpha=k_shortcut)
        text_out = F.scaled_dot_product_attention(text_query, keys, values, scale=scale)

    out = out.to(dtype).transpose(1, 2).reshape(B, -1, heads * head_dim)
    text_out = text_out.to(dtype).transpose(1, 2).reshape(B, -1, heads * head_dim)
    out = attn.to_out[1](attn.to_out[0](out))
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return out, text_out
