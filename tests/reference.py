"""DESIGN.md §2 written out token by token in float64: slow, obviously right, shares no code with agentsd."""

import math

import torch

from agentsd.merge import random_windows


def softmax_attention(q, k, v, scale):
    logits = (q @ k.T) * scale
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def attention(attn, tokens, agents, k_scale2, k_shortcut):
    """Per-head softmax attention of ``tokens`` (N'×C), through agents when given, then to_out."""
    Q, K, V = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    A = None if agents is None else attn.to_q(agents)
    d = K.shape[-1] // attn.heads
    s = d**-0.5
    heads = []
    for i in range(attn.heads):
        cols = slice(i * d, (i + 1) * d)
        q, k, v = Q[:, cols], K[:, cols], V[:, cols]
        if A is None:
            heads.append(softmax_attention(q, k, v, s))
        else:
            a = A[:, cols]
            agent_v = softmax_attention(a, k, v, s)
            heads.append(softmax_attention(q, a, agent_v, s**k_scale2) + k_shortcut * v)
    return attn.to_out[0](torch.cat(heads, dim=-1))


def dst_positions(h, w, sx, sy, windows):
    dst = []
    for i in range(h // sy):
        for j in range(w // sx):
            offset = 0 if windows is None else int(windows[i, j])
            dst.append((i * sy + offset // sx) * w + j * sx + offset % sx)
    return dst


def block_attention(attn, x, y, H, W, phase, max_downsample, k_scale2, k_shortcut, windows_fn):
    """Output of attn1 for block input ``x`` and normed input ``y`` (B×N×C), unmerged back to N tokens."""
    B, N, C = y.shape
    downsample = math.ceil(math.sqrt(H * W // N))
    r = int(N * phase.ratio)
    if downsample > max_downsample or r == 0:
        return torch.stack([attention(attn, y[b], None, k_scale2, k_shortcut) for b in range(B)])
    h, w = math.ceil(H / downsample), math.ceil(W / downsample)
    windows = windows_fn(h, w, phase.sx, phase.sy) if B % 2 == 0 else None
    dst = dst_positions(h, w, phase.sx, phase.sy, windows)
    src = [p for p in range(N) if p not in set(dst)]
    r = min(r, len(src))
    outputs = []
    for b in range(B):
        metric = x[b] / x[b].norm(dim=-1, keepdim=True)
        choice, similarity = {}, {}
        for s in src:
            sims = metric[dst] @ metric[s]
            best = int(torch.argmax(sims))
            choice[s], similarity[s] = dst[best], float(sims[best])
        ranked = sorted(src, key=lambda s: -similarity[s])

        def groups(k, ranked=ranked, choice=choice):
            members = {d: [d] for d in dst}
            for s in ranked[:k]:
                members[choice[s]].append(s)
            return [[s] for s in ranked[k:]] + [members[d] for d in dst]

        tome = groups(r)
        tokens = torch.stack([y[b, g].mean(dim=0) for g in tome])
        agents = None
        if phase.agent_ratio is not None:
            agent_r = min(int(N * phase.agent_ratio), len(src))
            if 2 * (N - agent_r) < N - r:
                agents = torch.stack([y[b, g].mean(dim=0) for g in groups(agent_r)])
        merged_out = attention(attn, tokens, agents, k_scale2, k_shortcut)
        out = torch.empty(N, merged_out.shape[-1], dtype=y.dtype)
        for row, group in enumerate(tome):
            for p in group:
                out[p] = merged_out[row]
        outputs.append(out)
    return torch.stack(outputs)


class ReferenceProcessor:
    def __init__(self, run, original):
        self.run = run
        self.original = original
        self.block_input = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        run = self.run
        return block_attention(
            attn,
            self.block_input,
            hidden_states,
            *run["size"],
            run["phase"],
            run["max_downsample"],
            run["k_scale2"],
            run["k_shortcut"],
            run["windows_fn"],
        )


def reference_unet(unet, phase, *, max_downsample=1, k_scale2=0.3, k_shortcut=0.075, seed=None):
    """A float64 copy of ``unet`` whose self-attention follows the reference; call it as ``ref(sample, t, ctx)``."""
    import copy

    from diffusers.models.attention import BasicTransformerBlock

    ref = copy.deepcopy(unet).double()
    counter = torch.zeros((), dtype=torch.long)

    def windows_fn(h, w, sx, sy):
        return None if seed is None else random_windows(h, w, sx, sy, seed, counter)

    run = dict(
        size=None,
        phase=phase,
        max_downsample=max_downsample,
        k_scale2=k_scale2,
        k_shortcut=k_shortcut,
        windows_fn=windows_fn,
    )
    for block in ref.modules():
        if isinstance(block, BasicTransformerBlock):
            processor = ReferenceProcessor(run, block.attn1.processor)
            block.attn1.set_processor(processor)
            block.register_forward_pre_hook(
                lambda module, args, kwargs, p=processor: setattr(p, "block_input", args[0]), with_kwargs=True
            )

    def call(sample, timestep, context):
        run["size"] = tuple(sample.shape[-2:])
        with torch.no_grad():
            return ref(sample.double(), timestep, context.double()).sample

    return call
