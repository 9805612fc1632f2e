"""DESIGN.md §2 written out token by token in float64: slow, obviously right, shares no code with agentsd."""

import math

import torch

_M32 = 0xFFFFFFFF


def _hash32(x):
    x &= _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def random_windows(h, w, sx, sy, seed, draw):
    """Draw ``draw`` of the dst offsets: window i (row-major) takes ``hash(hash(key + i)) mod sx·sy`` with
    ``key = (seed·0x9E3779B1 mod 2³²) + (draw·0x7FEB352D mod 2³²)`` (agentsd.merge.window_draws' docstring)."""
    key = ((seed * 0x9E3779B1) & _M32) + (((draw & _M32) * 0x7FEB352D) & _M32)
    columns = w // sx
    return [[_hash32(_hash32(key + i * columns + j)) % (sx * sy) for j in range(columns)] for i in range(h // sy)]


def softmax_attention(q, k, v, scale):
    logits = (q @ k.T) * scale
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def attention(attn, tokens, agents, k_scale2, k_shortcut, kv_tokens=None):
    """Per-head softmax attention of ``tokens`` (N'×C), through agents when given, then to_out; ``kv_tokens``:
    the tokens keys and values come from, if not ``tokens``."""
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    Q, K, V = attn.to_q(tokens), attn.to_k(kv_tokens), attn.to_v(kv_tokens)
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
            offset = 0 if windows is None else windows[i][j]
            dst.append((i * sy + offset // sx) * w + j * sx + offset % sx)
    return dst


def block_attention(attn, x, y, H, W, phase_of, k_scale2, k_shortcut, windows_fn, matchings=None):
    """attn1 for block input ``x`` and normed input ``y`` (B×N×C), unmerged back to N tokens, and the ToMe
    groups of each batch element (lists of token positions that share a merged token; ``None`` if unmerged).

    ``matchings``: this UNet call's ``{downsample: [(src, dst, choice, ranked) per batch element]}``; a phase
    with ``share_matching`` takes its level's entry when there is one and records its own when not."""
    B, N, C = y.shape
    downsample = math.ceil(math.sqrt(H * W // N))
    phase = phase_of(downsample)
    r = 0 if phase is None else int(N * phase.ratio)
    lean = phase is not None and phase.tokens == "all"
    if phase is not None and phase.min_tokens is None:
        raise ValueError("the reference takes explicit thresholds: give the phase min_tokens")
    if (r == 0 and not lean) or N < phase.min_tokens:
        return torch.stack([attention(attn, y[b], None, k_scale2, k_shortcut) for b in range(B)]), None
    h, w = math.ceil(H / downsample), math.ceil(W / downsample)
    if lean:
        return all_tokens_attention(attn, x, y, h, w, phase, k_scale2, k_shortcut, windows_fn, matchings), None
    shared = matchings is not None and phase.share_matching
    if shared and downsample in matchings:
        per_batch = matchings[downsample]
    else:
        # a level matched once per call takes the call's draw, a block matched on its own the next draw
        draw = "call" if phase.share_matching else None
        windows = windows_fn(h, w, phase.sx, phase.sy, draw) if B % 2 == 0 else None
        dst = dst_positions(h, w, phase.sx, phase.sy, windows)
        src = [p for p in range(N) if p not in set(dst)]
        per_batch = []
        for b in range(B):
            metric = x[b] / x[b].norm(dim=-1, keepdim=True)
            choice, similarity = {}, {}
            for s in src:
                sims = metric[dst] @ metric[s]
                best = int(torch.argmax(sims))
                choice[s], similarity[s] = dst[best], float(sims[best])
            per_batch.append((src, dst, choice, sorted(src, key=lambda s: -similarity[s])))
        if shared:
            matchings[downsample] = per_batch
    r = min(r, len(per_batch[0][0]))
    outputs, all_groups = [], []
    for b in range(B):
        src, dst, choice, ranked = per_batch[b]

        def groups(k, ranked=ranked, choice=choice, dst=dst):
            members = {d: [d] for d in dst}
            for s in ranked[:k]:
                members[choice[s]].append(s)
            return [[s] for s in ranked[k:]] + [members[d] for d in dst]

        tome = groups(r)
        all_groups.append(tome)
        tokens = torch.stack([y[b, g].mean(dim=0) for g in tome])
        agents = None
        if phase.agent_ratio is not None:
            ratio = phase.ratio if phase.agent_ratio is None else phase.agent_ratio
            agent_r = min(int(N * ratio), len(src))
            if 2 * (N - agent_r) < N - r:
                agents = torch.stack([y[b, g].mean(dim=0) for g in groups(agent_r)])
        merged_out = attention(attn, tokens, agents, k_scale2, k_shortcut)
        out = torch.empty(N, merged_out.shape[-1], dtype=y.dtype)
        for row, group in enumerate(tome):
            for p in group:
                out[p] = merged_out[row]
        outputs.append(out)
    return torch.stack(outputs), all_groups


def all_tokens_attention(attn, x, y, h, w, phase, k_scale2, k_shortcut, windows_fn, matchings):
    """``Phase(tokens="all")``: every token attends through agents, the mean of ``y`` over each agent group, or,
    without agents, over keys and values from the mean of ``y`` over each ToMe group.

    Merged groups: each src token picks its most similar dst (cosine of ``x``), the top-``k`` ranked src tokens
    (``agent_r``, or ``r`` without agents) merge into their dst, the others stay groups of their own. The dst
    draw is the UNet call's (``windows_fn(h, w, sx, sy, "call")``), shared by the level's blocks. Pooled agents:
    each whole window.
    """
    B, N, C = y.shape
    if phase.agents == "pooled":
        groups = [
            [(i * phase.sy + dy) * w + j * phase.sx + dx for dy in range(phase.sy) for dx in range(phase.sx)]
            for i in range(h // phase.sy)
            for j in range(w // phase.sx)
        ]
        per_batch = [groups] * B
    else:
        key = ("all", h, w)
        if phase.share_matching and key in matchings:
            per_batch = matchings[key]
        else:
            windows = windows_fn(h, w, phase.sx, phase.sy, "call") if B % 2 == 0 else None
            dst = dst_positions(h, w, phase.sx, phase.sy, windows)
            src = [p for p in range(N) if p not in set(dst)]
            ratio = phase.ratio if phase.agent_ratio is None else phase.agent_ratio
            agent_r = min(int(N * ratio), len(src))
            per_batch = []
            for b in range(B):
                metric = x[b] / x[b].norm(dim=-1, keepdim=True)
                sims = metric[src] @ metric[dst].T
                best, choice = sims.max(dim=-1)
                ranked = sorted(range(len(src)), key=lambda i: -float(best[i]))
                members = {d: [d] for d in dst}
                for i in ranked[:agent_r]:
                    members[dst[int(choice[i])]].append(src[i])
                per_batch.append([[src[i]] for i in ranked[agent_r:]] + list(members.values()))
            if phase.share_matching:
                matchings[key] = per_batch
    if phase.agent_ratio is None and phase.agents == "merged":  # merged keys and values
        return torch.stack(
            [
                attention(attn, y[b], None, k_scale2, k_shortcut, torch.stack([y[b, g].mean(dim=0) for g in groups]))
                for b, groups in enumerate(per_batch)
            ]
        )
    if 2 * len(per_batch[0]) >= N:  # as many agents as half the tokens: plain attention
        return torch.stack([attention(attn, y[b], None, k_scale2, k_shortcut) for b in range(B)])
    outputs = []
    for b in range(B):
        agents = torch.stack([y[b, g].mean(dim=0) for g in per_batch[b]])
        outputs.append(attention(attn, y[b], agents, k_scale2, k_shortcut))
    return torch.stack(outputs)


def per_group(fn, tokens, groups):
    """``fn`` on the mean of each group of ``tokens`` (N×C), its output copied back to every member."""
    merged_out = fn(torch.stack([tokens[g].mean(dim=0) for g in groups]))
    out = torch.empty(tokens.shape[0], merged_out.shape[-1], dtype=merged_out.dtype)
    for row, group in enumerate(groups):
        for p in group:
            out[p] = merged_out[row]
    return out


class ReferenceProcessor:
    """attn1 by the reference; it leaves its groups for the block's attn2 (``merge_crossattn``) and feed-forward
    (``merge_mlp``)."""

    def __init__(self, run, original):
        self.run = run
        self.original = original
        self.block_input = None
        self.groups = None
        self.phase = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        run = self.run
        out, groups = block_attention(
            attn,
            self.block_input,
            hidden_states,
            *run["size"],
            run["phase_of"],
            run["k_scale2"],
            run["k_shortcut"],
            run["windows_fn"],
            run["matchings"],
        )
        N = hidden_states.shape[1]
        phase = run["phase_of"](math.ceil(math.sqrt(run["size"][0] * run["size"][1] // N)))
        self.groups, self.phase = groups, phase
        return out


class ReferenceCrossAttention:
    """attn2 per batch element on the group means of its queries, when attn1 left groups."""

    def __init__(self, attn1_processor, original):
        self.attn1_processor, self.original = attn1_processor, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        groups, phase = self.attn1_processor.groups, self.attn1_processor.phase
        if groups is None or not phase.merge_crossattn:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        return torch.stack(
            [
                per_group(
                    lambda t, b=b: self.original(attn, t[None], encoder_hidden_states[b : b + 1])[0],
                    hidden_states[b],
                    groups[b],
                )
                for b in range(hidden_states.shape[0])
            ]
        )


def reference_unet(unet, phase, *, max_downsample=1, k_scale2=0.3, k_shortcut=0.075, seed=None):
    """A float64 copy of ``unet`` whose self-attention follows the reference; call it as ``ref(sample, t, ctx)``.

    ``phase``: one Phase for every level up to ``max_downsample``, or ``{downsample: Phase}``.
    """
    import copy

    from diffusers.models.attention import BasicTransformerBlock

    ref = copy.deepcopy(unet).double()
    draws = [0]  # the merged-token paths draw anew at every matching
    calls = [-1]

    def windows_fn(h, w, sx, sy, draw=None):
        if seed is None:
            return None
        if draw == "call":  # tokens="all": the draw of this UNet call (the call's number, cycling every 128)
            return random_windows(h, w, sx, sy, seed, calls[0] % 128)
        draws[0] += 1
        return random_windows(h, w, sx, sy, seed, draws[0] - 1)

    def phase_of(downsample):
        if isinstance(phase, dict):
            return phase.get(downsample)
        return phase if downsample <= max_downsample else None

    run = dict(
        size=None, phase_of=phase_of, k_scale2=k_scale2, k_shortcut=k_shortcut, windows_fn=windows_fn, matchings={}
    )
    for block in ref.modules():
        if isinstance(block, BasicTransformerBlock):
            processor = ReferenceProcessor(run, block.attn1.processor)
            block.attn1.set_processor(processor)
            block.attn2.set_processor(ReferenceCrossAttention(processor, block.attn2.processor))
            block.register_forward_pre_hook(
                lambda module, args, kwargs, p=processor: setattr(p, "block_input", args[0]), with_kwargs=True
            )
            block.ff.forward = _reference_ff(block.ff.forward, processor)

    def call(sample, timestep, context):
        run["size"] = tuple(sample.shape[-2:])
        run["matchings"] = {}
        calls[0] += 1
        with torch.no_grad():
            return ref(sample.double(), timestep, context.double()).sample

    return call


def _reference_ff(forward, attn1_processor):
    def ff(hidden_states, *args, **kwargs):
        groups, phase = attn1_processor.groups, attn1_processor.phase
        if groups is None or not phase.merge_mlp:
            return forward(hidden_states, *args, **kwargs)
        return torch.stack(
            [per_group(lambda t: forward(t[None])[0], hidden_states[b], groups[b]) for b in range(len(groups))]
        )

    return ff
