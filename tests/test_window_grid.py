"""benchmarks/studies/window_grid.py: the stripe index reads stripes on the window grid and nothing else."""

import torch
from conftest import load_script


def test_stripe_index_reads_steps_on_the_window_grid():
    study = load_script("window_grid")
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 3, 128, 128, generator=g)
    noise = reference + 0.05 * torch.randn(reference.shape, generator=g)
    assert abs(study.stripe_index(noise, reference, 32) - 1.0) < 0.1  # no preference for the grid
    blocks = torch.arange(128) // 32  # a value per 32-pixel window: steps at columns and rows 32, 64, 96
    striped = noise + 0.1 * (blocks[None, :] + blocks[:, None]).float()
    assert study.stripe_index(striped, reference, 32) > 2
    assert study.stripe_index(striped, reference, 32, offset=16) < 1.1  # the shifted grid sees none of them
    shifted = noise + 0.1 * ((torch.arange(128) + 16) // 32).float()[None, :]
    assert study.stripe_index(shifted, reference, 32, offset=16) > 1.5
