"""agentsd with DeepCache's step caching (package ``deepcache``), in either order, on SD 1.x and SDXL pipelines."""

import pytest
import torch
from conftest import tiny_pipeline, tiny_sdxl_pipeline
from DeepCache import DeepCacheSDHelper

import agentsd
from agentsd import Phase
from agentsd.bench.checks import forced  # lean with merging forced on at the tiny latents' 64 tokens

PIPELINES = {"sd": tiny_pipeline, "sdxl": tiny_sdxl_pipeline}
# Merging whole blocks at level 0 (and agents where the tiny latents allow) so both paths change the output.
SCHEDULE = {
    0: [Phase(sx=2, sy=2, ratio=0.5, agent_ratio=0.8, merge_crossattn=True, merge_mlp=True)],
    1: [Phase(sx=2, sy=2, ratio=0.4)],
}


def generate(pipe):
    return pipe(
        "a red circle",
        num_inference_steps=6,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize(
    "layout, agentsd_first, schedule",
    [*((layout, first, SCHEDULE) for layout in PIPELINES for first in (True, False)), ("sd", False, forced("lean"))],
    ids=["sd-first", "sd-second", "sdxl-first", "sdxl-second", "sd-lean"],
)
def test_deepcache_composes_and_both_undo_to_vanilla(layout, agentsd_first, schedule, tmp_path):
    pipe = PIPELINES[layout](tmp_path)
    pipe.set_progress_bar_config(disable=True)
    vanilla = generate(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)

    helper.enable()
    cached = generate(pipe)
    helper.disable()
    agentsd.apply(pipe, schedule, seed=0)
    merged = generate(pipe)
    agentsd.remove(pipe)

    if agentsd_first:
        agentsd.apply(pipe, schedule, seed=0)
        helper.enable()
    else:
        helper.enable()
        agentsd.apply(pipe, schedule, seed=0)
    both = generate(pipe)
    if agentsd_first:
        agentsd.remove(pipe)
        helper.disable()
    else:
        helper.disable()
        agentsd.remove(pipe)

    for other in (vanilla, cached, merged):
        assert (both - other).abs().max() > 1e-3
    assert torch.equal(generate(pipe), vanilla)
