"""DESIGN.md §11 written out in float64, per batch element, per head, token loops where they make it plain.

Slow and obviously right; shares no code with agentsd. A float64 copy of a Flux or Wan transformer whose chosen
blocks attend by the formulas; everything else is the model's own.
"""

import copy
import itertools
import math

import torch
from reference import _M32, _hash32, softmax_attention


def windows(grids, st, sy, sx, shift=False):
    """Every whole window of every grid as a list of image-token positions (frame-major, then row-major). A window
    larger than its grid in an axis takes the grid's size there. ``shift``: every window moved by half its size
    along each axis (rounded down), a window that runs past the grid's end taking the tokens at its start."""
    out, start = [], 0
    for f, h, w in grids:
        t, y, x = min(st, f), min(sy, h), min(sx, w)
        dt, dy, dx = (t // 2, y // 2, x // 2) if shift else (0, 0, 0)
        for a, b, c in itertools.product(range(f // t), range(h // y), range(w // x)):
            out.append(
                [
                    start + ((a * t + i + dt) % f) * h * w + ((b * y + j + dy) % h) * w + (c * x + k + dx) % w
                    for i, j, k in itertools.product(range(t), range(y), range(x))
                ]
            )
        start += f * h * w
    return out


def neighbourhoods(grids, st, sy, sx, reach):
    """For every whole window (``windows``' order), the windows its near field reads: those whose row and column
    indices lie within ``reach`` of its own in its frame, the range slid back inside the grid where it would leave
    it, so that it holds min(2·reach + 1, windows along the axis) indices on each axis."""
    out, first = [], 0
    for f, h, w in grids:
        t, y, x = min(st, f), min(sy, h), min(sx, w)
        nf, nb, nc = f // t, h // y, w // x

        def around(i, count):
            span = min(2 * reach + 1, count)
            lo = i - reach
            lo = max(0, min(lo, count - span))
            return range(lo, lo + span)

        for a, b, c in itertools.product(range(nf), range(nb), range(nc)):
            out.append([first + a * nb * nc + bb * nc + cc for bb in around(b, nb) for cc in around(c, nc)])
        first += nf * nb * nc
    return out


def tome_groups(metric, grids, st, sy, sx, seed=None, draw=None, shift=False):
    """Each window's dst (its first token, or the one at the drawn offset), and every other image token in the group
    of the dst of highest cosine similarity of ``metric`` (N×C)."""
    wins = windows(grids, st, sy, sx, shift)
    if seed is None:
        dst = [win[0] for win in wins]
    else:
        key = ((seed * 0x9E3779B1) & _M32) + (((draw & _M32) * 0x7FEB352D) & _M32)
        dst = [win[_hash32(_hash32(key + i)) % len(win)] for i, win in enumerate(wins)]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    groups = {d: [d] for d in dst}
    for p in range(metric.shape[0]):
        if p in groups:
            continue
        sims = [float(unit[p] @ unit[d]) for d in dst]
        groups[dst[max(range(len(dst)), key=lambda i: sims[i])]].append(p)
    return list(groups.values())


def flux_rotary(x, cos, sin):
    """Flux's RoPE on x (S×D): channel pairs (2i, 2i+1) rotated, cos/sin given per channel."""
    out = torch.empty_like(x)
    out[:, 0::2] = x[:, 0::2] * cos[:, 0::2] - x[:, 1::2] * sin[:, 0::2]
    out[:, 1::2] = x[:, 1::2] * cos[:, 1::2] + x[:, 0::2] * sin[:, 1::2]
    return out


def wan_rotary(x, cos, sin):
    """Wan's RoPE on x (S×D): pair i rotated by cos of channel 2i and sin of channel 2i+1."""
    out = torch.empty_like(x)
    c, s = cos[:, 0::2], sin[:, 1::2]
    out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
    out[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
    return out


def qwen_rotary(x, freqs):
    """Qwen-Image's RoPE on x (S×D): channel pair (2i, 2i+1) as a complex number times ``freqs[:, i]``."""
    freqs = freqs.to(torch.complex128)
    c, s = freqs.real, freqs.imag
    out = torch.empty_like(x)
    out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
    out[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
    return out


def agent_heads(
    q_x,
    k,
    v,
    q_t,
    v_x,
    groups,
    *,
    agents,
    scale,
    k_scale2,
    k_shortcut,
    text_first=True,
    text_keys=None,
    proportional=False,
    near=None,
    near_join="correct",
    reach=None,
):
    """One head of §11 and §12: ``q_x`` (N×d) image queries, ``k``/``v`` every token's keys and values in sequence
    order, ``q_t`` text queries (M×d), ``v_x`` the image values; ``text_keys``: how many of ``k`` are text keys where a
    mask left out some (``M`` if ``None``). ``proportional``: an agent's or merged key's logit gains log|g|. ``near``:
    the windows (lists of image positions) whose exact keys their own queries attend to, the summary standing for
    the rest only (an agent for the tokens of its window, window j being agent j's; a merged key for its tokens
    outside the query's window). ``reach``: for each window, the windows whose keys its queries read exactly (only
    its own if ``None``); "window j's keys" below then means the union of theirs, "every other agent" those of the
    other windows. ``near_join`` (with agents): ``"correct"``, the broadcast plus, for a query in window j,
    ρ_j (O_j(q) − O_j(a_j)), O_j the exact attention over window j's keys and ρ_j the share of agent j's softmax
    over every key that window holds; ``"softmax"``, one softmax over window j's exact keys and every other agent.
    Returns (image out N×d, text out M×d)."""
    M = q_t.shape[0] if text_keys is None else text_keys
    N = q_x.shape[0]
    k_t, k_x = (k[:M], k[M:]) if text_first else (k[N:], k[:N])
    v_t, v_x_all = (v[:M], v[M:]) if text_first else (v[N:], v[:N])
    bias = [math.log(len(g)) if proportional else 0.0 for g in groups]
    window_of = {}
    for j, win in enumerate(near or []):
        for p in win:
            window_of[p] = j
    reads = [reach[j] if reach is not None else [j] for j in range(len(near or []))]
    keys_read = [[p for jj in reads[j] for p in near[jj]] for j in range(len(near or []))]
    if agents:
        a = torch.stack([q_x[g].mean(0) for g in groups])
        v_a = softmax_attention(a, k, v, scale)
        out_t = softmax_attention(q_t, k, v, scale)
        if near is None:
            logits = q_x @ a.T * scale**k_scale2 + torch.tensor(bias, dtype=q_x.dtype)
            return torch.softmax(logits, -1) @ v_a + k_shortcut * v_x, out_t
        out_x = torch.empty_like(q_x)
        if near_join == "correct":  # the broadcast, the own window's exact part of the own agent swapped for q's
            logits = q_x @ a.T * scale**k_scale2 + torch.tensor(bias, dtype=q_x.dtype)
            broadcast = torch.softmax(logits, -1) @ v_a
            for i in range(N):
                if i not in window_of:
                    out_x[i] = broadcast[i] + k_shortcut * v_x[i]
                    continue
                j = window_of[i]
                mass = torch.exp(a[j] @ k.T * scale)
                rho = mass[[(M + m) if text_first else m for m in keys_read[j]]].sum() / mass.sum()
                local_q = softmax_attention(q_x[i : i + 1], k_x[keys_read[j]], v_x_all[keys_read[j]], scale)[0]
                local_a = softmax_attention(a[j : j + 1], k_x[keys_read[j]], v_x_all[keys_read[j]], scale)[0]
                out_x[i] = broadcast[i] + rho * (local_q - local_a)
            return out_x, out_t
        for i in range(N):
            own = keys_read[window_of[i]] if i in window_of else [i]
            others = [j for j in range(len(groups)) if i not in window_of or j not in reads[window_of[i]]]
            logits = [float(q_x[i] @ k_x[m]) * scale for m in own]
            logits += [float(q_x[i] @ a[j]) * scale**k_scale2 + bias[j] for j in others]
            values = [v_x_all[m] for m in own] + [v_a[j] for j in others]
            weights = torch.softmax(torch.tensor(logits, dtype=q_x.dtype), 0)
            out_x[i] = sum(w * val for w, val in zip(weights, values))
        return out_x, out_t
    k_bar = torch.stack([k_x[g].mean(0) for g in groups])
    v_bar = torch.stack([v_x_all[g].mean(0) for g in groups])
    k2, v2 = torch.cat([k_t, k_bar]), torch.cat([v_t, v_bar])
    logits = k2.new_zeros(len(k2))
    logits[M:] = torch.tensor(bias, dtype=k2.dtype)
    out_t = torch.softmax(q_t @ k2.T * scale + logits, -1) @ v2
    if near is None:
        return torch.softmax(q_x @ k2.T * scale + logits, -1) @ v2, out_t
    out_x = torch.empty_like(q_x)
    for i in range(N):
        own = keys_read[window_of[i]] if i in window_of else [i]
        logit, values = [], []
        for m in range(M):
            logit.append(float(q_x[i] @ k_t[m]) * scale)
            values.append(v_t[m])
        for m in own:
            logit.append(float(q_x[i] @ k_x[m]) * scale)
            values.append(v_x_all[m])
        for j, g in enumerate(groups):
            outside = [m for m in g if m not in own]
            if outside:  # the merged key weighs for its tokens outside the query's window only
                logit.append(float(q_x[i] @ k_bar[j]) * scale + bias[j] + math.log(len(outside) / len(g)))
                values.append(v_bar[j])
        weights = torch.softmax(torch.tensor(logit, dtype=q_x.dtype), 0)
        out_x[i] = sum(w * val for w, val in zip(weights, values))
    return out_x, out_t


class _Run:
    def __init__(self, phases, seed):
        self.phases, self.seed = phases, seed
        self.p, self.grids, self.batch, self.call, self.groups = None, None, None, -1, {}

    def phase(self):
        return next((ph for ph in self.phases if self.p < ph.end), self.phases[-1])

    def plan(self):
        """(phase, groups-maker) or None where the block runs plain attention."""
        phase = self.phase()
        assert phase.min_tokens is not None, "the reference takes explicit thresholds"
        n = sum(f * h * w for f, h, w in self.grids)
        if not phase.merges or n < phase.min_tokens:
            return None
        agents = phase.agent_ratio is not None or phase.agents == "pooled"
        if (2 if agents else 1) * len(windows(self.grids, phase.st, phase.sy, phase.sx)) >= n:
            return None  # agents as many as half the tokens, merged keys as many as the tokens
        return phase

    def near_field(self, phase, shifted):
        """agent_heads' §12 options of ``phase`` in a block whose windows shift if the phase shifts them."""
        near = windows(self.grids, phase.st, phase.sy, phase.sx, phase.shift and shifted) if phase.near else None
        join = "correct" if phase.near is True else phase.near or "correct"
        reach = getattr(phase, "near_reach", 0)
        reach = neighbourhoods(self.grids, phase.st, phase.sy, phase.sx, reach) if near and reach else None
        return dict(proportional=phase.proportional, near=near, near_join=join, reach=reach)

    def groups_of(self, phase, metric, b, shifted):
        win, shift = (phase.st, phase.sy, phase.sx), phase.shift and shifted
        if phase.agents == "pooled":
            return windows(self.grids, *win, shift)
        if (b, win, shift) not in self.groups:  # the first patched block of the call matches, the others reuse it
            rand = self.seed is not None and self.batch % 2 == 0
            self.groups[(b, win, shift)] = tome_groups(
                metric, self.grids, *win, seed=self.seed if rand else None, draw=self.call, shift=shift
            )
        return self.groups[(b, win, shift)]


def _split_heads(t, heads):
    return t.reshape(t.shape[0], heads, -1).transpose(0, 1)  # (heads, S, d)


def _install(all_blocks, blocks, Processor):
    """A ``Processor`` around the ``attn`` of each chosen block, handed the block's input as its matching metric;
    every other one (the second, fourth, ... in the model's order) shifts its windows where a phase says so."""
    for position, index in enumerate(sorted(blocks)):
        block = all_blocks[index]
        processor = Processor(block.attn.processor)
        processor.shifted = position % 2 == 1
        block.attn.set_processor(processor)

        def hook(module, args, kwargs, processor=processor):
            processor.block_input = kwargs["hidden_states"]

        block.register_forward_pre_hook(hook, with_kwargs=True)


def reference_flux(transformer, phases, blocks, *, k_scale2=0.3, k_shortcut=0.075, seed=None):
    """A float64 copy of a Flux transformer whose ``blocks`` (double-stream first, then single-stream) follow §11 with
    ``p = 1 - σ`` (a bare transformer: no time shift); ``ref(**forward kwargs)`` returns its output."""
    ref = copy.deepcopy(transformer).double()
    run = _Run(phases, seed)

    class Processor:
        def __init__(self, original):
            self.original, self.block_input = original, None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            phase = run.plan()
            if phase is None:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            H = attn.heads
            N = sum(f * h * w for f, h, w in run.grids)
            cos, sin = image_rotary_emb
            outs, texts = [], []
            for b in range(hidden_states.shape[0]):
                if encoder_hidden_states is not None:
                    image, text = hidden_states[b], encoder_hidden_states[b]
                    tq, tk, tv = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
                    tq = attn.norm_added_q(tq.unflatten(-1, (H, -1))).flatten(-2)
                    tk = attn.norm_added_k(tk.unflatten(-1, (H, -1))).flatten(-2)
                else:
                    text, image = hidden_states[b, :-N], hidden_states[b, -N:]
                    tq, tk, tv = attn.to_q(text), attn.to_k(text), attn.to_v(text)
                    tq = attn.norm_q(tq.unflatten(-1, (H, -1))).flatten(-2)
                    tk = attn.norm_k(tk.unflatten(-1, (H, -1))).flatten(-2)
                q, k, v = attn.to_q(image), attn.to_k(image), attn.to_v(image)
                q = attn.norm_q(q.unflatten(-1, (H, -1))).flatten(-2)
                k = attn.norm_k(k.unflatten(-1, (H, -1))).flatten(-2)
                M = text.shape[0]
                q_all, k_all, v_all = (_split_heads(torch.cat([t, x]), H) for t, x in ((tq, q), (tk, k), (tv, v)))
                groups = run.groups_of(phase, self.block_input[b], b, self.shifted)
                agents = phase.agent_ratio is not None or phase.agents == "pooled"
                head_x, head_t = [], []
                for i in range(H):
                    qi = flux_rotary(q_all[i], cos, sin)
                    ki = flux_rotary(k_all[i], cos, sin)
                    d = qi.shape[-1]
                    ox, ot = agent_heads(
                        qi[M:],
                        ki,
                        v_all[i],
                        qi[:M],
                        v_all[i][M:],
                        groups,
                        agents=agents,
                        scale=d**-0.5,
                        k_scale2=k_scale2,
                        k_shortcut=k_shortcut,
                        **run.near_field(phase, self.shifted),
                    )
                    head_x.append(ox)
                    head_t.append(ot)
                out_x, out_t = torch.cat(head_x, -1), torch.cat(head_t, -1)
                if encoder_hidden_states is not None:
                    outs.append(attn.to_out[1](attn.to_out[0](out_x)))
                    texts.append(attn.to_add_out(out_t))
                else:
                    outs.append(torch.cat([out_t, out_x]))
            if encoder_hidden_states is not None:
                return torch.stack(outs), torch.stack(texts)
            return torch.stack(outs)

    _install([*ref.transformer_blocks, *ref.single_transformer_blocks], blocks, Processor)

    def call(*, hidden_states, timestep, img_ids, **kwargs):
        ids = img_ids.long()
        grids, start = [], 0
        while start < len(ids):
            end = start
            while end < len(ids) and ids[end, 0] == ids[start, 0]:
                end += 1
            h = int(ids[start:end, 1].max() - ids[start, 1]) + 1
            grids.append((1, h, (end - start) // h))
            start = end
        run.grids, run.p = tuple(grids), 1 - float(timestep.reshape(-1)[0])
        run.batch, run.call, run.groups = hidden_states.shape[0], run.call + 1, {}
        kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.no_grad():
            return ref(
                hidden_states=hidden_states.double(), timestep=timestep.double(), img_ids=img_ids.double(), **kwargs
            ).sample

    return call


def reference_wan(transformer, phases, blocks, *, k_scale2=0.3, k_shortcut=0.075, seed=None):
    """A float64 copy of a Wan transformer whose ``blocks`` follow §11 in self-attention (no text there) with
    ``p = 1 - t/1000`` (a bare transformer: no time shift)."""
    ref = copy.deepcopy(transformer).double()
    run = _Run(phases, seed)

    class Processor:
        def __init__(self, original):
            self.original, self.block_input = original, None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            phase = run.plan()
            if phase is None:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            H = attn.heads
            cos, sin = (t.reshape(t.shape[1], -1) for t in rotary_emb)
            outs = []
            for b in range(hidden_states.shape[0]):
                x = hidden_states[b]
                q, k, v = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(x)), attn.to_v(x)
                q, k, v = _split_heads(q, H), _split_heads(k, H), _split_heads(v, H)
                groups = run.groups_of(phase, self.block_input[b], b, self.shifted)
                agents = phase.agent_ratio is not None or phase.agents == "pooled"
                heads = []
                for i in range(H):
                    qi, ki = wan_rotary(q[i], cos, sin), wan_rotary(k[i], cos, sin)
                    empty = qi[:0]
                    ox, _ = agent_heads(
                        qi,
                        ki,
                        v[i],
                        empty,
                        v[i],
                        groups,
                        agents=agents,
                        scale=qi.shape[-1] ** -0.5,
                        k_scale2=k_scale2,
                        k_shortcut=k_shortcut,
                        **run.near_field(phase, self.shifted),
                    )
                    heads.append(ox)
                outs.append(attn.to_out[1](attn.to_out[0](torch.cat(heads, -1))))
            return torch.stack(outs)

    for position, index in enumerate(sorted(blocks)):
        block = ref.blocks[index]
        processor = Processor(block.attn1.processor)
        processor.shifted = position % 2 == 1
        block.attn1.set_processor(processor)

        def hook(module, args, kwargs, processor=processor):
            processor.block_input = args[0] if args else kwargs["hidden_states"]

        block.register_forward_pre_hook(hook, with_kwargs=True)

    def call(*, hidden_states, timestep, encoder_hidden_states, **kwargs):
        p_t, p_h, p_w = ref.config.patch_size
        _, _, f, h, w = hidden_states.shape
        run.grids, run.p = ((f // p_t, h // p_h, w // p_w),), 1 - float(timestep.reshape(-1).max()) / 1000
        run.batch, run.call, run.groups = hidden_states.shape[0], run.call + 1, {}
        with torch.no_grad():
            return ref(
                hidden_states=hidden_states.double(),
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states.double(),
                **kwargs,
            ).sample

    return call


def reference_qwen(transformer, phases, blocks, *, k_scale2=0.3, k_shortcut=0.075, seed=None):
    """A float64 copy of a Qwen-Image transformer whose ``blocks`` follow §11 over ``[T; X]`` with ``p = 1 - σ`` (a
    bare transformer: no time shift); text tokens the mask leaves out are dropped from the keys and values."""
    ref = copy.deepcopy(transformer).double()
    run = _Run(phases, seed)

    class Processor:
        def __init__(self, original):
            self.original, self.block_input = original, None

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            encoder_hidden_states_mask=None,
            attention_mask=None,
            image_rotary_emb=None,
        ):
            phase = run.plan()
            if phase is None:
                return self.original(
                    attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                    image_rotary_emb,
                )  # fmt: skip
            H = attn.heads
            image_freqs, text_freqs = image_rotary_emb
            outs, texts = [], []
            for b in range(hidden_states.shape[0]):
                image, text = hidden_states[b], encoder_hidden_states[b]
                q, k, v = attn.to_q(image), attn.to_k(image), attn.to_v(image)
                q = attn.norm_q(q.unflatten(-1, (H, -1))).flatten(-2)
                k = attn.norm_k(k.unflatten(-1, (H, -1))).flatten(-2)
                tq, tk, tv = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
                tq = attn.norm_added_q(tq.unflatten(-1, (H, -1))).flatten(-2)
                tk = attn.norm_added_k(tk.unflatten(-1, (H, -1))).flatten(-2)
                keep = [
                    i for i in range(text.shape[0])
                    if encoder_hidden_states_mask is None or bool(encoder_hidden_states_mask[b, i])
                ]  # fmt: skip
                groups = run.groups_of(phase, self.block_input[b], b, self.shifted)
                agents = phase.agent_ratio is not None or phase.agents == "pooled"
                head_x, head_t = [], []
                for i in range(H):
                    qx, kx = (qwen_rotary(t, image_freqs) for t in (_split_heads(q, H)[i], _split_heads(k, H)[i]))
                    qt, kt = (qwen_rotary(t, text_freqs) for t in (_split_heads(tq, H)[i], _split_heads(tk, H)[i]))
                    vx, vt = _split_heads(v, H)[i], _split_heads(tv, H)[i]
                    ox, ot = agent_heads(
                        qx,
                        torch.cat([kt[keep], kx]),
                        torch.cat([vt[keep], vx]),
                        qt,
                        vx,
                        groups,
                        agents=agents,
                        scale=qx.shape[-1] ** -0.5,
                        k_scale2=k_scale2,
                        k_shortcut=k_shortcut,
                        **run.near_field(phase, self.shifted),
                        text_keys=len(keep),
                    )
                    head_x.append(ox)
                    head_t.append(ot)
                outs.append(attn.to_out[0](torch.cat(head_x, -1)))
                texts.append(attn.to_add_out(torch.cat(head_t, -1)))
            return torch.stack(outs), torch.stack(texts)

    _install(ref.transformer_blocks, blocks, Processor)

    def call(*, hidden_states, timestep, img_shapes, **kwargs):
        run.grids, run.p = tuple(tuple(s) for s in img_shapes[0]), 1 - float(timestep.reshape(-1)[0])
        run.batch, run.call, run.groups = hidden_states.shape[0], run.call + 1, {}
        kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.no_grad():
            return ref(
                hidden_states=hidden_states.double(), timestep=timestep.double(), img_shapes=img_shapes, **kwargs
            ).sample

    return call
