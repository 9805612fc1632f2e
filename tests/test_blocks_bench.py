"""``agentsd bench blocks`` on tiny Flux and Wan configs: the JSON, and the model time summed from its blocks."""

import argparse
import json

import pytest

from agentsd.bench import blocks


@pytest.fixture
def tiny(monkeypatch):
    flux = {**blocks.FLUX, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32}
    flux.update(pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    wan = {**blocks.WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 16, "freq_dim": 32}
    wan.update(ffn_dim=32, rope_max_seq_len=64)
    monkeypatch.setitem(blocks.MODELS, "flux", ("flux", flux, {"double": 19, "single": 38}, "tiny flux"))
    monkeypatch.setitem(blocks.MODELS, "wan", ("wan", wan, {"block": 30}, "tiny wan"))
    monkeypatch.setitem(blocks.VIDEO_SIZES, "tiny", (9, 128, 128))
    monkeypatch.setattr(blocks, "TEXT_TOKENS", 7)


def _bench(argv):
    parser = argparse.ArgumentParser()
    blocks.add_arguments(parser)
    return blocks.bench(parser.parse_args(argv))


@pytest.mark.parametrize("model,size", [("flux", "256"), ("wan", "tiny")])
def test_blocks_bench_writes_every_method_and_sums_the_model(tiny, tmp_path, model, size):
    out = tmp_path / "r.json"
    assert _bench(["--model", model, "--sizes", size, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    summary = results["sizes"][size]
    counts = results["blocks"]
    assert set(summary["times"]) == {m for m in blocks.methods_for(model) if "+" not in m}  # §12's by name
    block = summary["block_median"]
    # vanilla: every block of each kind at its kind's time
    assert summary["model_s"]["vanilla"] == pytest.approx(sum(n * block["vanilla"][k] for k, n in counts.items()))
    # a preset's phase: the two edge blocks at each end run vanilla, the rest the method
    early = f"{model}-early"
    kinds = list(counts)
    edges = {k: 2 * ((i == 0) + (i == len(kinds) - 1)) for i, k in enumerate(kinds)}
    expected = sum(edges[k] * block["vanilla"][k] + (n - edges[k]) * block[early][k] for k, n in counts.items())
    assert summary["model_s"][early] == pytest.approx(expected)
    # the preset over a run: its phases weighted by their share of sampling
    late = summary["model_s"][f"{model}-late"]
    assert summary["model_s"][model] == pytest.approx(0.4 * summary["model_s"][early] + 0.6 * late)
    assert out.with_suffix(".md").read_text().count("|") > 10


def test_blocks_bench_times_the_section_12_options_by_name(tiny, tmp_path):
    out = tmp_path / "r.json"
    methods = ["vanilla", "flux-bare+both-early", "flux-bare+both-late"]
    assert _bench(["--model", "flux", "--sizes", "256", "--methods", *methods, "--out", str(out)]) == 0
    model_s = json.loads(out.read_text())["sizes"]["256"]["model_s"]
    both = 0.4 * model_s["flux-bare+both-early"] + 0.6 * model_s["flux-bare+both-late"]
    assert model_s["flux-bare+both"] == pytest.approx(both)
    assert "flux" not in model_s and "flux-bare" not in model_s


def test_blocks_bench_refuses_what_it_cannot_time(tiny, tmp_path):
    with pytest.raises(ValueError, match="vanilla must be timed"):
        _bench(["--model", "flux", "--methods", "flux-early", "--out", str(tmp_path / "r.json")])
    with pytest.raises(ValueError, match="unknown method"):
        _bench(["--model", "wan", "--methods", "vanilla", "sd3-early", "--out", str(tmp_path / "r.json")])
    with pytest.raises(ValueError, match="takes sizes"):
        _bench(["--model", "wan", "--sizes", "1024", "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_blocks_bench_times_shifted_windows_in_every_block(tiny, model):
    import torch

    net = blocks.build(model, torch.device("cpu"), torch.float32)
    attns = blocks._attentions(net)
    undo = blocks.methods_for(model)[f"{model}+all-late"](net)
    # as applied, every other patched block shifts (the first does not); the bench shifts them all
    assert [attn.processor.shifted for attn in attns] == [True] * len(attns)
    undo()
    undo = blocks.methods_for(model)[f"{model}+both-late"](net)
    assert attns[0].processor.shifted is False
    undo()
