"""The shipped demo model, its data generator and its evaluator."""

import numpy as np
import pytest
import torch

from agentsd.demo import MODEL_DIR, Evaluator, Obj, Scene, load_pipeline, parse, prompts, sample, scenes, vocabulary
from agentsd.demo.data import IMAGE_SIZE, POSITIONS
from agentsd.demo.evaluator import WEIGHTS


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.load()


def test_pipeline_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = load_pipeline()
    assert p.unet.dtype == torch.float32 and p.text_encoder.dtype == torch.float32
    assert p.safety_checker is None
    assert p.scheduler.config.num_train_timesteps == 1000
    assert p.tokenizer.model_max_length == p.text_encoder.config.max_position_embeddings


def test_top_level_self_attention_sees_the_whole_latent(pipe):
    seen = []
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    handle = block.attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    side = pipe.unet.config.sample_size
    with torch.no_grad():
        pipe.unet(torch.zeros(1, 4, side, side), 500, torch.zeros(1, 20, pipe.unet.config.cross_attention_dim))
    handle.remove()
    assert seen and set(seen) == {side * side}
    assert sum(1 for b in pipe.unet.down_blocks if getattr(b, "attentions", None)) >= 2


def test_shipped_weights_are_small():
    model = sum(f.stat().st_size for f in MODEL_DIR.glob("*/*.safetensors"))
    assert 0 < model <= 25e6
    assert WEIGHTS.stat().st_size <= 5e6


def test_short_generation(pipe):
    captions = [s.caption for s in prompts(2, seed=3)]
    images = pipe(captions, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert images.shape == (2, 3, side, side)
    assert images.flatten(1).std(1).min() > 0.02
    assert 0 <= images.min() and images.max() <= 1


def test_sample_is_deterministic_per_seed_and_split():
    a, b = sample(8, seed=5), sample(8, seed=5)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.scenes == b.scenes
    assert not torch.equal(a.images, sample(8, seed=6).images)
    assert a.captions != sample(8, seed=5, split="test").captions
    assert a.images.dtype == torch.uint8 and a.images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_captions_state_the_attributes():
    batch = sample(64, seed=0, num_objects=None)
    assert {len(s.objects) for s in batch.scenes} == {1, 2}
    for caption, scene in zip(batch.captions, batch.scenes):
        assert parse(caption) == scene and scene.caption == caption
        assert set(caption.split()) <= set(vocabulary())
        if len(scene.objects) == 2:
            assert {scene.objects[0].position, scene.objects[1].position} in ({"left", "right"}, {"top", "bottom"})
    assert parse("a large white cross at the top and a small red circle at the bottom") == Scene(
        (Obj("cross", "white", "large", "top"), Obj("circle", "red", "small", "bottom"))
    )
    with pytest.raises(ValueError):
        parse("a red circle")


def test_objects_are_drawn_where_the_caption_says():
    batch = sample(32, seed=1, num_objects=1)
    for image, scene in zip(batch.images, batch.scenes):
        (x, y), _ = POSITIONS[scene.objects[0].position]
        x, y = x * IMAGE_SIZE // 64, y * IMAGE_SIZE // 64  # geometry is in 1/64 of the side
        background = image[:, 0, 0].float()
        assert (image[:, y, x].float() - background).abs().max() > 40  # the object covers its centre


def test_prompts_are_the_held_out_stream():
    held_out = prompts(20, seed=2, num_objects=2)
    assert held_out == scenes(20, seed=2, num_objects=2, split="test")
    assert held_out != scenes(20, seed=2, num_objects=2, split="train")
    assert all(len(s.objects) == 2 for s in held_out)


def test_evaluator_reads_real_images(evaluator):
    batch = sample(200, seed=7, num_objects=None, split="test")
    scores = evaluator.accuracy(batch.images, batch.scenes)
    assert scores.overall >= 0.97 and scores.n == 200
    found = evaluator.predict(batch.images)
    assert np.mean([set(f.objects) == set(t.objects) for f, t in zip(found, batch.scenes)]) == scores.overall
    shuffled = evaluator.accuracy(batch.images, batch.captions[1:] + batch.captions[:1])
    assert shuffled.overall < 0.2


def test_evaluator_accepts_pil_arrays_and_floats(evaluator):
    batch = sample(4, seed=8, split="test")
    as_uint8 = evaluator.accuracy(batch.images, batch.captions).overall
    as_float = evaluator.accuracy(batch.images.float() / 255, batch.captions).overall
    as_numpy = evaluator.accuracy(batch.images.permute(0, 2, 3, 1).numpy(), batch.captions).overall
    from PIL import Image

    as_pil = evaluator.accuracy(
        [Image.fromarray(np.asarray(im.permute(1, 2, 0))) for im in batch.images], batch.captions
    )
    assert as_uint8 == as_float == as_numpy == as_pil.overall


def test_evaluator_features_work_as_fid_feature_module(evaluator):
    with torch.no_grad():
        small = evaluator(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
        large = evaluator(torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8))
    assert isinstance(evaluator, torch.nn.Module)
    assert small.shape == (3, evaluator.num_features) and large.shape == (1, evaluator.num_features)
    assert small.dtype == torch.float32
