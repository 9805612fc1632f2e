"""Where does the Flux preset's distance from vanilla on the DiT proving ground come from?

Probes on the miniature Flux.1 (``--model demo-flux``), each a method for ``agentsd bench quality`` beside those
it ships (``flux``, ``flux-no-late``, ``flux-agents-2x2``, ``flux-plain-broadcast``):

- ``flux-late-only``: no agents at all, the preset's merged keys and values (2×2 windows) for the whole run: how far
  the ToMe-style path alone moves the images;
- ``flux-text-exact``: the preset with every image query reading the agents and the text keys in one softmax
  (``softmax([Q_X Aᵀ s^k_scale2; Q_X K_Tᵀ s]) [V_A; V_T]``) instead of the agents alone: whether the
  image-from-text route through the agents is what costs;
- ``flux+both-no-late``, ``flux+both-late-only``: ``flux+both``'s agent phase alone (vanilla after it) and its late
  phase alone (for the whole run);
- ``flux-block-<k>``: the ``flux`` preset in block ``k`` alone: which blocks a preset can patch; ``flux-last-blocks``,
  ``flux+both-last-blocks``: in the last four blocks instead of the middle four.

Run from the repository root with vanilla's images linked in, e.g. for the first 100 one-object captions::

    mkdir -p runs/probe/images && ln -s "$PWD/benchmarks/results/quality_demo_flux/images/none" runs/probe/images/none
    python benchmarks/studies/dit_probes.py --model demo-flux --prompts demo:1 --num 100 --force \\
        --methods none flux-late-only --out runs/probe

The arguments are ``agentsd bench quality``'s. Answers: ``benchmarks/results/quality_demo_flux_probes/``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F

import agentsd.families
from agentsd.bench import quality
from agentsd.dit import _heads_mean, agent_attention
from agentsd.schedule import PRESETS, Phase

# Probes of the Flux preset as it was measured, before DESIGN §12's options became its default: flux-bare (the
# flux+both probes: the options' flux-bare+both, flux as of 6b40729; flux+all: flux-bare+all).
_BOTH, _ALL = quality.METHODS["flux-bare+both"]["schedule"], quality.METHODS["flux-bare+all"]["schedule"]
# flux as of 9a45504, before its near field reached the 3x3 windows around the query's own (flux-own-window)
_OWN = quality.METHODS["flux-own-window"]["schedule"]
PROBES = {
    "flux-late-only": {"schedule": (dataclasses.replace(PRESETS["flux-bare"][1], end=1.0),)},
    "flux-text-exact": {"schedule": "flux-bare"},
    # per-block sensitivity: the flux preset in one block at a time (the proving ground's 2 double- and 6 single-stream
    # blocks: 0-1 and 2-7)
    **{f"flux-block-{k}": {"schedule": "flux-bare", "blocks": [k]} for k in range(8)},
    # the flux preset in the last four blocks (the least sensitive one by one) instead of the middle four, alone and
    # with proportional attention and the near field
    "flux-last-blocks": {"schedule": "flux-bare", "blocks": [4, 5, 6, 7]},
    "flux+both-last-blocks": {"schedule": _BOTH, "blocks": [4, 5, 6, 7]},
    # flux+both's two phases apart: its agent phase then vanilla, and its late phase (merged keys and values with the
    # near field) for the whole run
    "flux+both-no-late": {"schedule": (_BOTH[0], Phase(end=1.0, ratio=0.0))},
    "flux+both-late-only": {"schedule": (dataclasses.replace(_BOTH[1], end=1.0),)},
    # the same with shifted windows (flux+all's phases apart)
    "flux+all-no-late": {"schedule": (_ALL[0], Phase(end=1.0, ratio=0.0))},
    "flux+all-late-only": {"schedule": (dataclasses.replace(_ALL[1], end=1.0),)},
    # finer summaries, phase by phase: flux+both's agent phase with one agent per 2x2 window (then vanilla), and its
    # late phase over pairs of tokens (2x1 windows, half the keys merged away, instead of three in four) for the whole
    # run
    "flux+both-2x2-no-late": {
        "schedule": (
            dataclasses.replace(_BOTH[0], sx=2, sy=2),
            Phase(end=1.0, ratio=0.0),
        )
    },
    "flux+both-late-2x1-only": {"schedule": (dataclasses.replace(_BOTH[1], end=1.0, sx=2, sy=1, ratio=0.5),)},
    # flux+both's agent phase (with the near field) for the whole run: no merged keys at all
    "flux+both-whole-run": {"schedule": (dataclasses.replace(_BOTH[0], end=1.0),)},
    "flux+all-whole-run": {"schedule": (dataclasses.replace(_ALL[0], end=1.0),)},
    # flux (both options) with a coarser late phase than its 2x2 windows of 6b40729: one merged key per 4x2 window (an
    # eighth of the image keys) or per 4x4 window (a sixteenth; what flux took after it), the near field over that
    # window: fewer keys for speed, the exact window for quality
    "flux-late-4x2": {"schedule": (_OWN[0], dataclasses.replace(_OWN[1], sx=4, sy=2, ratio=0.875))},
    "flux-late-4x4": {"schedule": (_OWN[0], dataclasses.replace(_OWN[1], sx=4, sy=4, ratio=0.9375))},
    # the near field over the 5x5 windows around each query's own (flux's: 3x3)
    "flux+reach2": {"schedule": tuple(dataclasses.replace(p, near_reach=2) for p in _OWN)},
    # flux-own-window with the 3x3 near field in one phase only: which phase's window borders draw the stripes
    "flux+early-reach": {"schedule": (dataclasses.replace(_OWN[0], near_reach=1), _OWN[1])},
    "flux+late-reach": {"schedule": (_OWN[0], dataclasses.replace(_OWN[1], near_reach=1))},
}


def text_exact_attention(query, key, value, layout, *, agents=None, keys_of=None, scale=None, k_scale2=0.3,
                         k_shortcut=0.075, upcast=False, text_mask=None, **options):  # fmt: skip
    """:func:`agentsd.dit.agent_attention` with the image queries reading ``[agents; text keys]`` in one softmax
    (AgentSD's broadcast otherwise: DESIGN §12's ``options`` on, or no text)."""
    if agents is None or layout.text == 0 or text_mask is not None or upcast or any(options.values()):
        return agent_attention(
            query, key, value, layout, agents=agents, keys_of=keys_of, scale=scale, k_scale2=k_scale2,
            k_shortcut=k_shortcut, upcast=upcast, text_mask=text_mask, **options,
        )  # fmt: skip
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    (q_image, q_text), (_, k_text), (v_image, v_text) = (layout.split(t) for t in (query, key, value))
    agent = _heads_mean(agents, q_image).transpose(1, 2)  # (B, H, n, D)
    n = agent.shape[2]
    gathered = F.scaled_dot_product_attention(
        torch.cat([agent, q_text.transpose(1, 2)], dim=2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
    )
    agent_value, out_text = gathered[:, :, :n], gathered[:, :, n:]
    q = q_image.transpose(1, 2)
    logits = torch.cat([q @ agent.transpose(-1, -2) * scale**k_scale2, q @ k_text.permute(0, 2, 3, 1) * scale], dim=-1)
    out_image = logits.softmax(-1) @ torch.cat([agent_value, v_text.transpose(1, 2)], dim=2)
    out_image = out_image.transpose(1, 2) + k_shortcut * v_image
    return layout.join(out_image, out_text.transpose(1, 2)).to(query.dtype)


# probes whose late phase `agentsd bench blocks` can time at the real width: ``<probe>-late``
LATE_PROBES = ("flux-late-4x2", "flux-late-4x4")


def main(argv: list[str]) -> int:
    from agentsd.cli import main as cli

    if argv[:1] == ["blocks"]:  # dit_probes.py blocks --model flux --methods vanilla flux-late flux-late-4x2-late ...
        from agentsd.bench import blocks

        methods_for = blocks.methods_for

        def with_probes(model):
            late = {f"{p}-late": blocks.phase_method(PROBES[p]["schedule"][1]) for p in LATE_PROBES}
            return {**methods_for(model), **(late if model == "flux" else {})}

        blocks.methods_for = with_probes
        try:
            return cli(["bench", *argv])
        finally:
            blocks.methods_for = methods_for
    quality.METHODS.update(PROBES)
    methods = argv[argv.index("--methods") + 1 :] if "--methods" in argv else []
    if "flux-text-exact" in methods:
        if any(m in methods for m in ("flux-bare", "flux-merged", "flux-no-late", "flux-agents-2x2")):
            raise SystemExit("flux-text-exact replaces agent_attention for the whole run: give it its own run")
        agentsd.families.agent_attention = text_exact_attention
    return cli(["bench", "quality", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
