"""Phases of the denoising run and the presets that chain them. No diffusers here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

__all__ = [
    "DEFAULT",
    "DEVICE_MIN_TOKENS",
    "DIT_DEFAULT",
    "DIT_EDGE_BLOCKS",
    "DIT_PRESETS",
    "FAMILY_DEFAULTS",
    "PRESETS",
    "Phase",
    "Schedule",
    "min_tokens_on",
    "phase_at",
    "progress",
    "resolve_schedule",
]


@dataclass(frozen=True)
class Phase:
    """Merging settings for one stretch of sampling.

    Important args:
        end: sampling progress ``p = 1 - t/T`` at which this phase stops; the last phase ends at 1.0.
        ratio: fraction of tokens merged away by ToMe (``r = int(N·ratio)``).
        agent_ratio: fraction of tokens merged away to make the agents; ``None`` runs ToMe only.

    Args to tinker with:
        sx, sy: window size; one dst token per window.
        st: frames per window, for video DiTs (Wan): windows of st frames × sy rows × sx columns of the patch
            grid. 1 on images (UNets take no other value).
        merge_crossattn: also run the block's cross-attention on the merged tokens (as ToMeSD's
            ``merge_crossattn``), unmerged before its residual add. Cheap in quality: on the 128² proving
            ground it cost ``fast`` 0.4 dB of PSNR against vanilla and no caption accuracy.
        merge_mlp: also run the block's feed-forward on the merged tokens (as ToMeSD's ``merge_mlp``).
            Saves the most time of the two but costs quality: on the proving ground it took ``fast`` from
            40.8 to 29.7 dB of PSNR against vanilla and from 68% to 64% caption accuracy (speckled images).
        share_matching: match once per level and UNet call: the level's first block to run matches its own
            input, the level's later blocks merge their tokens (and make their agents) by that matching instead
            of matching theirs. Saves the matching and the index work of the merges: SD 1.5 forwards at 512² on a
            CPU 2.5-4.3% faster than ``fast`` with a matching per block, and on the proving ground no quality lost
            (42.8 dB against vanilla where the per-block matching reads 40.6 dB).
        min_tokens: leave a block alone when it has fewer tokens: there merging costs more than it saves.
            ``None``: the default of the device the model runs on (``DEVICE_MIN_TOKENS``).
        tokens: ``"merged"`` (AgentSD's): queries, keys and values come from the ToMe-merged tokens, and the
            output is unmerged. ``"all"``, the lean path for GPUs: every token keeps its own query and output
            (nothing unmerged), and either only the agents are merged (``agent_ratio``, ``ratio=0``: keys and
            values from every token) or, without agents, only the keys and values are (``ratio > 0``: softmax
            attention of every query over the ToMe-merged tokens). When the merge takes every src token
            (``ratio`` or ``agent_ratio >= 1 - 1/(sx·sy)`` on grids the windows tile) nothing is sorted either.
        agents: ``"merged"`` (AgentSD's): agents are ToMe-merged tokens (``agent_ratio``). ``"pooled"``: the mean
            of each sx×sy window (Agent Attention's backbones), one op; needs ``tokens="all"`` and no
            ``agent_ratio``. With ``tokens="all"`` merged agents whose ``agent_ratio`` merges every src token
            (``agent_ratio >= 1 - 1/(sx·sy)`` on grids the windows tile) need no ranking either.
        proportional: proportional attention (ToMe's): the logit of a merged key or of an agent gains ``log|g|``,
            ``|g|`` the tokens its group holds, so it weighs like them: against the text keys of joint attention,
            and among groups of unequal size. ``tokens="all"`` only.
        near: near field exact (DiTs): each image query's attention over the exact keys of its own sx×sy(×st)
            window joins the summary of the rest. Late phase: one softmax over them and the merged keys less the
            window's shares. With agents, ``True`` or ``"correct"``: the broadcast, with the query's exact attention
            over its window swapped in for its agent's (weighed by the share of the agent's softmax that window
            holds); ``"softmax"``: DESIGN §12.2's one softmax over the window's keys and the other windows' agents.
            ``tokens="all"`` on DiTs only.
        near_reach: how many windows on each side of a query's own the near field reads exactly, along the rows and
            the columns (not across frames): 0, its own window; 1, the 3×3 windows around it (at a grid's edge the
            3×3 windows nearest it, so that every window reads as many). The summary stands for the tokens outside
            them only, and a token's neighbours across its window's border are never summaries. Needs ``near``.
        shift: shifted windows (Swin's): every other patched block shifts its windows (the agents', the merged keys'
            dst and the near field's) by half a window along each axis, wrapping around the grid's edges, so that
            window borders do not lie at the same place in every block. ``tokens="all"`` on DiTs only.
    """

    end: float = 1.0
    sx: int = 2
    sy: int = 2
    ratio: float = 0.5
    agent_ratio: float | None = None
    merge_crossattn: bool = False
    merge_mlp: bool = False
    share_matching: bool = False
    min_tokens: int | None = 0
    tokens: str = "merged"
    agents: str = "merged"
    st: int = 1
    proportional: bool = False
    near: bool | str = False
    shift: bool = False
    near_reach: int = 0

    def __post_init__(self):
        for name in ("sx", "sy", "st", "min_tokens", "near_reach"):
            value = getattr(self, name)
            if name == "min_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Phase.{name} must be an int, got {type(value).__name__}")
        if not (self.near is False or self.near is True or self.near in ("correct", "softmax")):
            raise ValueError(f"Phase.near must be False, True, 'correct' or 'softmax', got {self.near!r}")
        for name in ("merge_crossattn", "merge_mlp", "share_matching", "proportional", "shift"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Phase.{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.near_reach < 0:
            raise ValueError(f"Phase.near_reach must be >= 0, got {self.near_reach}")
        if self.near_reach and self.near is False:
            raise ValueError("Phase(near_reach > 0) widens the near field: it needs near=True")
        if self.min_tokens is not None and self.min_tokens < 0:
            raise ValueError(f"Phase.min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("sx", "sy", "st"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Phase.{name} must be >= 1, got {value}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"Phase.ratio must be in [0, 1), got {self.ratio}")
        if self.agent_ratio is not None and not 0.0 <= self.agent_ratio < 1.0:
            raise ValueError(f"Phase.agent_ratio must be None or in [0, 1), got {self.agent_ratio}")
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"Phase.end must be in (0, 1], got {self.end}")
        if self.tokens not in ("merged", "all"):
            raise ValueError(f"Phase.tokens must be 'merged' or 'all', got {self.tokens!r}")
        if self.agents not in ("merged", "pooled"):
            raise ValueError(f"Phase.agents must be 'merged' or 'pooled', got {self.agents!r}")
        if self.tokens == "all":
            agents = self.makes_agents
            if agents and self.ratio != 0.0:
                raise ValueError(
                    f"Phase(tokens='all') with agents merges nothing else: ratio must be 0.0, got {self.ratio}"
                )
            if not agents and self.ratio == 0.0:
                raise ValueError("Phase(tokens='all') needs agents (agent_ratio) or merged keys and values (ratio > 0)")
            if self.merge_crossattn or self.merge_mlp:
                raise ValueError("Phase(tokens='all') unmerges nothing: merge_crossattn and merge_mlp must be off")
        for name in ("proportional", "near", "shift"):
            if getattr(self, name) and self.tokens != "all":
                raise ValueError(f"Phase({name}=True) needs tokens='all' (the lean path)")
        if self.agents == "pooled":
            if self.tokens != "all":
                raise ValueError("Phase(agents='pooled') needs tokens='all'")
            if self.agent_ratio is not None:
                raise ValueError("Phase(agents='pooled') makes one agent per window: agent_ratio must be None")

    @property
    def near_join(self) -> str | None:
        """How the near field joins the agents (``near``'s), or ``None`` without a near field."""
        return None if self.near is False else "correct" if self.near is True else self.near

    @property
    def makes_agents(self) -> bool:
        """Whether this phase makes agents (ToMe-merged or pooled), as against merging tokens or keys only."""
        return self.agent_ratio is not None or self.agents == "pooled"

    @property
    def merges(self) -> bool:
        """Whether this phase changes a block at all (it merges tokens or makes agents)."""
        return self.ratio > 0 or (self.tokens == "all" and self.makes_agents)


Phases = tuple[Phase, ...]
# One list of phases for every patched level, or one list per level: level 0 is the
# highest-resolution level that has self-attention, level 1 the next, and so on.
Schedule = Union[str, Phase, Sequence[Phase], Mapping[int, Sequence[Phase]]]

# Fewest tokens at which merging a block pays, per device type (``Phase(min_tokens=None)``), as measured
# in whole runs (benchmarks/results/speed_runs_cpu.json, benchmarks/results/gpu/<card>/). On a CPU the attention's
# O(N²) part outweighs the merge's small ops from about 1,024 tokens. On a GPU fused attention is so cheap
# and every small op's launch so costly in comparison that, on an H200, merging 16,384-token levels made
# SD 1.5 at 1024² slower while the 65,536-token level at 2048² ran twice as fast: other devices take 32,768.
DEVICE_MIN_TOKENS = {"cpu": 1024}
ACCELERATOR_MIN_TOKENS = 32768
# The same for the lean path (``tokens="all"``), which adds a few dense ops per block where the merged-token
# paths add dozens: on a CPU it pays where they do; on accelerators 16,384 tokens (SD 1.5 at 1024², SDXL at
# 2048²) is an estimate from the op count and attention's share, until `agentsd calibrate` measures the card.
LEAN_DEVICE_MIN_TOKENS = {"cpu": 1024}
LEAN_ACCELERATOR_MIN_TOKENS = 16384
# Lean thresholds measured on this machine's devices by `agentsd calibrate`, by (device type, dtype, "eager" or
# "compiled"), loaded by agentsd.calibration.load(): they take precedence over the two lines above.
CALIBRATED_MIN_TOKENS: dict[tuple[str, str, str], int] = {}


def min_tokens_on(phase: Phase, device_type: str, dtype=None, compiled: bool = False) -> int:
    """The fewest tokens a block needs for ``phase`` to merge it on a device of ``device_type``.

    ``dtype`` and ``compiled`` (whether the UNet runs under torch.compile) pick a calibrated lean threshold.
    """
    if phase.min_tokens is not None:
        return phase.min_tokens
    if phase.tokens == "all":
        key = (device_type, str(dtype).removeprefix("torch."), "compiled" if compiled else "eager")
        if key in CALIBRATED_MIN_TOKENS:
            return CALIBRATED_MIN_TOKENS[key]
        return LEAN_DEVICE_MIN_TOKENS.get(device_type, LEAN_ACCELERATOR_MIN_TOKENS)
    return DEVICE_MIN_TOKENS.get(device_type, ACCELERATOR_MIN_TOKENS)


_FAST = dict(merge_crossattn=True, share_matching=True, min_tokens=None)
_LEAN = dict(tokens="all", share_matching=True, min_tokens=None)

PRESETS: dict[str, Phases | dict[int, Phases]] = {
    # AgentSD's published SD 1.5 setting: agents early, plain ToMe once the layout is set.
    "paper": (Phase(end=0.4, sx=4, sy=4, ratio=0.4, agent_ratio=0.95), Phase(end=1.0, sx=2, sy=2, ratio=0.4)),
    # ToMeSD's defaults.
    "tome": (Phase(end=1.0, sx=2, sy=2, ratio=0.5),),
    # Beyond the paper: agents on the two highest-resolution levels while the layout forms, harder ToMe
    # after (three tokens in four merged away at the top level); cross-attention always runs on the merged
    # tokens, the feed-forward never (merge_mlp costs quality); one matching per level and UNet call. Blocks
    # with fewer tokens than the device's DEVICE_MIN_TOKENS are left alone (there merging costs more than it saves).
    "fast": {
        level: (
            Phase(end=0.5, sx=4, sy=4, ratio=ratio, agent_ratio=0.95, **_FAST),
            Phase(end=1.0, sx=2, sy=2, ratio=late_ratio, **_FAST),
        )
        for level, ratio, late_ratio in ((0, 0.5, 0.75), (1, 0.4, 0.5))
    },
    # The lean path, and the default. While the layout forms (AgentSD's first 40%), agent attention of every token:
    # the agents are ToMe-merged tokens, each src token of a 4x4 window grid merged into its most similar dst (one
    # agent per window). After it, every query attends over ToMe-merged keys and values (2x2 windows, every src
    # merged), which keeps an image closer to vanilla than agents do there. One matching per level and UNet call;
    # no sort, no unmerge: a few dense ops per block. Levels 0 and 1, each where it has enough tokens to pay.
    "lean": {
        level: (
            Phase(end=0.4, sx=4, sy=4, ratio=0.0, agent_ratio=0.95, **_LEAN),
            Phase(end=1.0, sx=2, sy=2, ratio=0.75, **_LEAN),
        )
        for level in (0, 1)
    },
    # lean with pooled agents: the mean of each 4x4 window (Agent Attention's backbones), no matching for them.
    "pooled": {
        level: (
            Phase(end=0.4, sx=4, sy=4, ratio=0.0, agents="pooled", **_LEAN),
            Phase(end=1.0, sx=2, sy=2, ratio=0.75, **_LEAN),
        )
        for level in (0, 1)
    },
    # SD 3 / 3.5 (one level: a DiT's blocks all see the patch grid). The lean path as on a UNet: agent attention of
    # every image token while the layout forms, then every query over ToMe-merged image keys and values; text
    # queries attend exactly. agentsd.apply leaves the first and last DIT_EDGE_BLOCKS blocks alone by default.
    "sd3": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.0, agent_ratio=0.95, **_LEAN),
        Phase(end=1.0, sx=2, sy=2, ratio=0.75, **_LEAN),
    ),
    # AgentSD's published setting carried over to joint attention: the image tokens merged before the projections
    # (agents early, ToMe after), joint attention over the merged image tokens and the text, then unmerged.
    "sd3-paper": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.4, agent_ratio=0.95, share_matching=True, min_tokens=None),
        Phase(end=1.0, sx=2, sy=2, ratio=0.4, share_matching=True, min_tokens=None),
    ),
    # Flux.1 (double- and single-stream blocks, RoPE): the lean path on a DiT. While the layout forms, every image
    # token attends through pooled agents, the mean of each 4x4 window of the rotated queries (one op, nothing to
    # match); then every query attends over ToMe-merged image keys and values, one per 4x4 window (every src merged
    # into its most similar dst, one matching per call on the first patched block's input). Text queries attend
    # exactly throughout. Both phases with proportional attention and the near field (DESIGN §12): each image query
    # reads its own window's 16 keys exactly, and every agent and merged key weighs as many tokens as it stands for.
    # Chosen on the DiT proving grounds against flux-bare: closer to vanilla (256 tokens, 500 captions, with 2x2 late
    # windows: caption accuracy 42.6% -> 48.4%, 24.6 -> 25.8 dB; 1,024 tokens: 22.4 -> 25.2 dB, SSIM 0.932 -> 0.959),
    # and the late phase's 4x4 windows as close as 2x2 ones with the near field (100 captions: 25.1 against 25.2 dB at
    # 1,024 tokens, 26.1 against 26.1 at 256) for a fifth less time in a late block (Flux.1 2048² CPU blocks). The near
    # field reads the 3x3 windows around the query's own (near_reach=1): the stripes along the window grid gone
    # (stripe index 2.77 -> 1.11 at 1,024 tokens), 25.4 -> 28.2 dB there and 26.1 -> 31.0 dB at 256 tokens, for 9% of
    # the time at Flux.1 2048² (CPU blocks: 1.47x over a run against 1.61x).
    "flux": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.0, agents="pooled", proportional=True, near=True, near_reach=1, **_LEAN),
        Phase(end=1.0, sx=4, sy=4, ratio=0.9375, proportional=True, near=True, near_reach=1, **_LEAN),
    ),
    # The Flux preset before DESIGN §12's options: flux's agent phase without them, then merged keys and values of 2x2
    # windows. Further from vanilla.
    "flux-bare": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.0, agents="pooled", **_LEAN),
        Phase(end=1.0, sx=2, sy=2, ratio=0.75, **_LEAN),
    ),
    # flux-bare with ToMe-merged agents (each src token of a 4x4 window grid in its most similar dst's group).
    "flux-merged": (
        Phase(end=0.4, sx=4, sy=4, ratio=0.0, agent_ratio=0.95, **_LEAN),
        Phase(end=1.0, sx=2, sy=2, ratio=0.75, **_LEAN),
    ),
    # Wan 2.x video: pooled agents over 3-D windows (3 latent frames x 2 rows x 4 columns of the patch grid: one agent
    # per 24 tokens) while the layout and motion form, then every query over ToMe-merged keys and values
    # (1x2x2 windows).
    "wan": (
        Phase(end=0.4, st=3, sy=2, sx=4, ratio=0.0, agents="pooled", **_LEAN),
        Phase(end=1.0, st=1, sy=2, sx=2, ratio=0.75, **_LEAN),
    ),
    # Wan, harder: one agent per 3x4x4 window (48 tokens), then keys and values merged over 2x2x2 windows (8 tokens).
    "wan-fast": (
        Phase(end=0.4, st=3, sy=4, sx=4, ratio=0.0, agents="pooled", **_LEAN),
        Phase(end=1.0, st=2, sy=2, sx=2, ratio=0.875, **_LEAN),
    ),
}
# Qwen-Image (double-stream blocks over [T; X], RoPE, a padded prompt's mask): flux's phases, the same lean path
# (its options' worth is measured on the Flux ground: Qwen-Image has no proving ground of its own).
PRESETS["qwen"] = PRESETS["flux"]


DEFAULT = "lean"  # what agentsd.apply(pipe) runs on a UNet
DIT_DEFAULT = "sd3"  # and on an SD 3 transformer
FAMILY_DEFAULTS = {"flux": "flux", "wan": "wan", "qwen": "qwen"}  # and on the other DiT families
# the presets for DiTs (one level, bands of blocks)
DIT_PRESETS = ("sd3", "sd3-paper", "flux", "flux-bare", "flux-merged", "wan", "wan-fast", "qwen")
DIT_EDGE_BLOCKS = 2  # blocks at each end of a DiT that agentsd.apply leaves alone unless told (the sensitive ones)


def resolve_schedule(schedule: Schedule) -> Phases | dict[int, Phases]:
    """Turn a preset name, a sequence of phases or a ``{level: phases}`` mapping into validated phases."""
    if isinstance(schedule, str):
        if schedule not in PRESETS:
            raise ValueError(f"unknown schedule preset {schedule!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[schedule]
    if isinstance(schedule, Mapping):
        if not schedule:
            raise ValueError("a per-level schedule needs at least one level")
        for level in schedule:
            if isinstance(level, bool) or not isinstance(level, int) or level < 0:
                raise ValueError(f"schedule levels are ints >= 0 (0 = highest resolution), got {level!r}")
        return {level: _phases(schedule[level]) for level in sorted(schedule)}
    return _phases(schedule)


def _phases(schedule: Phase | Sequence[Phase]) -> Phases:
    if isinstance(schedule, Phase):
        schedule = (schedule,)
    phases = tuple(schedule)
    if not phases:
        raise ValueError("a schedule needs at least one Phase")
    for phase in phases:
        if not isinstance(phase, Phase):
            raise TypeError(f"a schedule holds agentsd.Phase objects, got {type(phase).__name__}")
    ends = [phase.end for phase in phases]
    if any(a >= b for a, b in zip(ends, ends[1:])):
        raise ValueError(f"phase ends must increase strictly, got {ends}")
    if ends[-1] != 1.0:
        raise ValueError(f"the last phase must end at 1.0, got {ends[-1]}")
    return phases


def progress(timestep: float, num_train_timesteps: int) -> float:
    """Sampling progress ``p = 1 - t/T``: 0 at pure noise, 1 at the clean image."""
    return 1.0 - float(timestep) / num_train_timesteps


def phase_at(phases: Sequence[Phase], p: float) -> Phase:
    """The phase that runs at progress ``p``: the first whose ``end`` lies beyond ``p``."""
    for phase in phases:
        if p < phase.end:
            return phase
    return phases[-1]
