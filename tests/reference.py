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


def softmax_attention(q, k, v, scale, bias=None):
    """``bias``: a number per key added to its logit (proportional attention's log|g|), or ``None``."""
    logits = (q @ k.T) * scale
    if bias is not None:
        logits = logits + torch.tensor(bias, dtype=logits.dtype)
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def attention(attn, tokens, agents, k_scale2, k_shortcut, kv_tokens=None, bias=None):
    """Per-head softmax attention of ``tokens`` (N'×C), through agents when given, then to_out; ``kv_tokens``:
    the tokens keys and values come from, if not ``tokens``; ``bias``: added to the logit of each agent (with
    agents) or of each key (without)."""
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
            heads.append(softmax_attention(q, k, v, s, bias))
        else:
            a = A[:, cols]
            agent_v = softmax_attention(a, k, v, s)
            heads.append(softmax_attention(q, a, agent_v, s**k_scale2, bias) + k_shortcut * v)
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

    def bias(groups):  # proportional attention: a merged key or an agent weighs like the tokens of its group
        return [math.log(len(g)) for g in groups] if phase.proportional else None

    if phase.agent_ratio is None and phase.agents == "merged":  # merged keys and values
        return torch.stack(
            [
                attention(
                    attn,
                    y[b],
                    None,
                    k_scale2,
                    k_shortcut,
                    torch.stack([y[b, g].mean(dim=0) for g in groups]),
                    bias(groups),
                )
                for b, groups in enumerate(per_batch)
            ]
        )
    if 2 * len(per_batch[0]) >= N:  # as many agents as half the tokens: plain attention
        return torch.stack([attention(attn, y[b], None, k_scale2, k_shortcut) for b in range(B)])
    outputs = []
    for b in range(B):
        agents = torch.stack([y[b, g].mean(dim=0) for g in per_batch[b]])
        outputs.append(attention(attn, y[b], agents, k_scale2, k_shortcut, bias=bias(per_batch[b])))
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


def window_groups(metric, h, w, sx, sy, windows, k):
    """One batch element's ToMe groups (lists of token positions): each src token picks the dst of highest cosine
    similarity of ``metric`` (N×C), the ``k`` most similar src tokens merge into theirs, the rest stay alone."""
    N = metric.shape[0]
    dst = dst_positions(h, w, sx, sy, windows)
    src = [p for p in range(N) if p not in set(dst)]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sims = unit[src] @ unit[dst].T
    best, choice = sims.max(dim=-1)
    ranked = sorted(range(len(src)), key=lambda i: -float(best[i]))
    k = min(k, len(src))
    members = {d: [d] for d in dst}
    for i in ranked[:k]:
        members[dst[int(choice[i])]].append(src[i])
    return [[src[i]] for i in ranked[k:]] + list(members.values())


def _heads(t, heads):
    return t.reshape(t.shape[0], heads, -1).transpose(0, 1)  # (heads, n, d)


def joint_reference(
    attn,
    image,
    text,
    *,
    tome=None,
    agent_groups=None,
    kv_groups=None,
    k_scale2=0.3,
    k_shortcut=0.075,
    proportional=False,
):
    """DESIGN.md §10 with §11's agents, for one batch element: image tokens ``image`` (N×C), text ``text`` (M×C,
    ``None`` for SD 3.5's image-only attn2, which then follows the UNet formulas).

    ``tome``: ToMe groups (lists of token positions) the image tokens merge into before the projections;
    ``agent_groups``: groups of token positions whose agents are the mean of their tokens' queries (after the
    norms; a token merged by ``tome`` brings its merged row's query); ``kv_groups``: groups whose means of the
    image keys and values (after the norms) replace them. Image-only (SD 3.5's attn2, the UNet formulas): the agents
    and merged keys are the projections of the groups' mean tokens. ``proportional``: a merged key's or an agent's
    logit gains log|g|. Returns (image output N×C, text output M×C or ``None``).
    """
    tokens = image if tome is None else torch.stack([image[g].mean(0) for g in tome])
    row_of = list(range(image.shape[0]))
    for row, group in enumerate(tome or []):
        for p in group:
            row_of[p] = row
    H = attn.heads

    def project(linear, norm, x):
        t = _heads(linear(x), H)
        return t if norm is None else norm(t)

    q_x, v_own = project(attn.to_q, attn.norm_q, tokens), project(attn.to_v, None, tokens)
    keys, values = project(attn.to_k, attn.norm_k, tokens), v_own
    unet_formulas = text is None  # SD 3.5's attn2: agents and merged keys are projected (and normed) means of tokens
    if kv_groups is not None and unet_formulas:
        kv_source = torch.stack([tokens[g].mean(0) for g in kv_groups])
        keys, values = project(attn.to_k, attn.norm_k, kv_source), project(attn.to_v, None, kv_source)
    elif kv_groups is not None:
        keys = torch.stack([keys[:, g].mean(1) for g in kv_groups], 1)
        values = torch.stack([values[:, g].mean(1) for g in kv_groups], 1)
    q_t = None
    if text is not None:
        q_t = project(attn.add_q_proj, attn.norm_added_q, text)
        keys = torch.cat([keys, project(attn.add_k_proj, attn.norm_added_k, text)], 1)
        values = torch.cat([values, project(attn.add_v_proj, None, text)], 1)
    a = None
    if agent_groups is not None and unet_formulas:
        a = project(attn.to_q, attn.norm_q, torch.stack([image[g].mean(0) for g in agent_groups]))
    elif agent_groups is not None:
        a = torch.stack([q_x[:, [row_of[p] for p in g]].mean(1) for g in agent_groups], 1)
    s = attn.scale
    agent_bias = [math.log(len(g)) for g in agent_groups] if proportional and agent_groups is not None else None
    key_bias = None
    if proportional and kv_groups is not None:
        key_bias = [math.log(len(g)) for g in kv_groups] + [0.0] * (keys.shape[1] - len(kv_groups))
    out_x, out_t = [], []
    for i in range(H):
        if a is not None:
            agent_v = softmax_attention(a[i], keys[i], values[i], s)
            out_x.append(softmax_attention(q_x[i], a[i], agent_v, s**k_scale2, agent_bias) + k_shortcut * v_own[i])
            if q_t is not None:
                out_t.append(softmax_attention(q_t[i], keys[i], values[i], s))
        else:
            queries = q_x[i] if q_t is None else torch.cat([q_x[i], q_t[i]])
            both = softmax_attention(queries, keys[i], values[i], s, key_bias)
            out_x.append(both[: len(tokens)])
            out_t.append(both[len(tokens) :])
    merged_out = attn.to_out[0](torch.cat(out_x, dim=-1))
    text_out = None
    if text is not None:
        text_out = torch.cat(out_t, dim=-1)
        text_out = text_out if attn.context_pre_only else attn.to_add_out(text_out)
    if tome is None:
        return merged_out, text_out
    out = torch.empty(image.shape[0], merged_out.shape[-1], dtype=merged_out.dtype)
    for row, group in enumerate(tome):
        for p in group:
            out[p] = merged_out[row]
    return out, text_out


def reference_transformer(transformer, phases, blocks, *, k_scale2=0.3, k_shortcut=0.075, seed=None):
    """A float64 copy of an SD 3 transformer whose ``blocks`` follow DESIGN.md §10; ``ref(sample, t, ctx, pooled)``
    returns its output.

    ``phases``: a sequence of Phase (each with explicit ``min_tokens``) picked by ``p = 1 - t/1000``; every phase
    matches once per call (the first patched block on its input, the others reuse it) on the call's dst draw
    (call ``c`` takes draw ``c mod 128``; odd batches the top-left dst). SD 3.5's attn2 follows the UNet formulas
    on the same matching.
    """
    import copy

    ref = copy.deepcopy(transformer).double()
    run = dict(size=None, p=None, call=-1, batch=None, matchings={})

    def phase_now():
        return next((ph for ph in phases if run["p"] < ph.end), phases[-1])

    def groups_for(x_b, b, phase, k):
        h, w = run["size"]
        key = (b, phase.sx, phase.sy, k)
        if key not in run["matchings"]:
            windows = None
            if seed is not None and run["batch"] % 2 == 0:
                windows = random_windows(h, w, phase.sx, phase.sy, seed, run["call"] % 128)
            run["matchings"][key] = window_groups(x_b, h, w, phase.sx, phase.sy, windows, k)
        return run["matchings"][key]

    class Joint:
        def __init__(self, original):
            self.original, self.block_input = original, None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            phase = phase_now()
            B, N, _ = hidden_states.shape
            h, w = run["size"]
            assert phase.min_tokens is not None, "the reference takes explicit thresholds"
            plain = N < phase.min_tokens or N != h * w
            outs, texts = [], []
            for b in range(B):
                x_b, y_b = self.block_input[b], hidden_states[b]
                text = None if encoder_hidden_states is None else encoder_hidden_states[b]
                settings = {}
                if plain:
                    pass
                elif phase.tokens == "merged":
                    r = int(N * phase.ratio)
                    settings["tome"] = groups_for(x_b, b, phase, r)
                    if phase.agent_ratio is not None:
                        groups = groups_for(x_b, b, phase, int(N * phase.agent_ratio))
                        if 2 * len(groups) < len(settings["tome"]):
                            settings["agent_groups"] = groups
                else:
                    settings["proportional"] = phase.proportional
                    k = int(N * (phase.ratio if phase.agent_ratio is None else phase.agent_ratio))
                    groups = groups_for(x_b, b, phase, k)
                    if phase.agent_ratio is None:
                        settings["kv_groups"] = groups
                    elif 2 * len(groups) < N:  # else plain attention
                        settings["agent_groups"] = groups
                out, text_out = joint_reference(attn, y_b, text, k_scale2=k_scale2, k_shortcut=k_shortcut, **settings)
                outs.append(out)
                texts.append(text_out)
            if encoder_hidden_states is None:
                return torch.stack(outs)
            return torch.stack(outs), torch.stack(texts)

    for index in blocks:
        block = ref.transformer_blocks[index]
        processors = []
        for attn in (block.attn, getattr(block, "attn2", None)):
            if attn is not None:
                processors.append(Joint(attn.processor))
                attn.set_processor(processors[-1])

        def hook(module, args, kwargs, processors=tuple(processors)):
            for processor in processors:
                processor.block_input = kwargs["hidden_states"]

        block.register_forward_pre_hook(hook, with_kwargs=True)

    def call(sample, timestep, context, pooled):
        size = ref.config.patch_size
        run.update(size=(sample.shape[-2] // size, sample.shape[-1] // size), p=1 - float(timestep) / 1000)
        run.update(matchings={}, batch=sample.shape[0], call=run["call"] + 1)
        with torch.no_grad():
            return ref(
                hidden_states=sample.double(),
                encoder_hidden_states=context.double(),
                pooled_projections=pooled.double(),
                timestep=torch.full((sample.shape[0],), float(timestep), dtype=torch.float64),
            ).sample

    return call
