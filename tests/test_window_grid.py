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


def test_images_of_bench_quality_folders_are_measured_as_sampled_ones(tmp_path):
    """--images: each method's first --num images from the first bench quality folder that holds them."""
    import json

    import numpy as np
    from PIL import Image

    study = load_script("window_grid")
    g = torch.Generator().manual_seed(1)
    vanilla = (torch.rand(2, 3, 64, 64, generator=g) * 200).round()
    blocks = (torch.arange(64) // 32).float()  # steps at the 32-pixel windows' borders
    striped = vanilla + 40 * blocks[None, :] + 3 * torch.randn(vanilla.shape, generator=g).round()
    for folder, method, batch in (("a", "none", vanilla), ("b", "flux", striped), ("a", "flux", vanilla + 1)):
        (tmp_path / folder / "images" / method).mkdir(parents=True)
        for i, image in enumerate(batch.clamp(0, 255).to(torch.uint8)):
            Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(
                tmp_path / folder / "images" / method / f"{i:05d}.png"
            )
    argv = ["--images", str(tmp_path / "b"), str(tmp_path / "a"), "--num", "2", "--methods", "none", "flux"]
    assert study.main([*argv, "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "window_grid.json").read_text())
    expected = study.stripe_index(striped.clamp(0, 255).round() / 255, vanilla / 255, 32)
    assert results["size"] == 64 and abs(results["methods"]["flux"]["agent_grid"] - expected) < 1e-6
    assert results["methods"]["flux"]["agent_grid"] > 1.5  # folder b's striped images, not folder a's
