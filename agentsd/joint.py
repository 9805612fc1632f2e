"""Agent attention in SD 3's joint (MMDiT) attention, through the DiT core (:mod:`agentsd.dit`).

A ``JointTransformerBlock`` attends over the image tokens X (N, on the h×w patch grid) and the
text tokens T (M) at once, the image first. This adapter projects both streams as the model does
(``to_q/k/v`` + ``norm_q/k`` for X, ``add_*_proj`` + ``norm_added_q/k`` for T) and hands them to
:func:`agentsd.dit.agent_attention` (DESIGN.md §11): agents, the mean of the image queries of each
ToMe group (matched on the patch grid by the block's image input), gather from every key; image
queries read the agents; text queries attend exactly. Without agents every query attends over the
text and the image keys and values merged per group (``tokens="all"``), or the image tokens are
merged before the projections (``tokens="merged"``, AgentSD's) and unmerged after. SD 3.5's
image-only ``attn2`` follows the UNet formulas (:class:`~agentsd.attention.AgentAttnProcessor`).
"""

from __future__ import annotations

from .attention import AgentAttnProcessor, _project_qkv
from .dit import Layout, agent_attention

__all__ = ["JointAgentProcessor"]


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
        query, key, value, layout = _joint_heads(attn, image, encoder_hidden_states)
        out = agent_attention(
            query,
            key,
            value,
            layout,
            agents=agents,
            keys_of=keys_of,
            scale=attn.scale,
            k_scale2=config.k_scale2,
            k_shortcut=config.k_shortcut,
            upcast=config.attn_precision == "fp32",
            proportional=phase.proportional,
        ).flatten(2, 3)
        out, context = layout.split(out)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        if not attn.context_pre_only:
            context = attn.to_add_out(context.contiguous())
        return (out if tokens is None else tokens.unmerge(out)), context


def _joint_heads(attn, image, context):
    """Queries, keys and values ``(B, N + M, heads, head_dim)`` of the image and text streams after their norms, image
    first, and their layout."""
    heads = attn.heads
    query, key, value = (t.unflatten(-1, (heads, -1)) for t in _project_qkv(attn, image))
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_added_qkv", None) is not None:
        text = attn.to_added_qkv(context).chunk(3, dim=-1)
    else:
        text = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
    text_query, text_key, text_value = (t.unflatten(-1, (heads, -1)) for t in text)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    layout = Layout(context.shape[1], False, (), image.shape[1])
    return (
        layout.join(query, text_query),
        layout.join(key, text_key),
        layout.join(value, text_value),
        layout,
    )
