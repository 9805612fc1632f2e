"""`agentsd bench ops`: kernel ops of one UNet call per preset, and the lean path's budget."""

import json

from agentsd.bench import ops
from agentsd.cli import main


def test_op_budget_of_the_lean_path(tmp_path):
    """The SD 1.5 architecture (the count does not depend on the size: 128² keeps the test fast)."""
    out = tmp_path / "ops.json"
    assert main(["bench", "ops", "--size", "128", "--presets", "paper", "lean", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["vanilla"]["kernels"] > 500
    paper, lean = results["presets"]["paper"], results["presets"]["lean"]
    assert [row["phase"] for row in paper] == ["agent", "tome"]
    assert [row["phase"] for row in lean] == ["agent", "tome"]
    assert [row["merged_blocks"] for row in paper + lean] == [5, 5, 10, 10]  # lean: levels 0 and 1
    for row in lean:  # the budget: at most 6 kernel ops per patched block over vanilla
        assert row["extra_per_block"] <= ops.TARGETS["lean"][row["phase"]]
    assert min(row["extra_per_block"] for row in paper) > 5 * max(row["extra_per_block"] for row in lean)
    assert "| lean | agent |" in out.with_suffix(".md").read_text()


def test_counter_leaves_views_out():
    import torch

    x = torch.randn(4, 4)
    with ops.OpCounter() as counter:
        y = x.view(16) + 1  # a view, then one kernel
        y.reshape(4, 4).transpose(0, 1).contiguous()  # two views, then one copy
        torch.empty(3)  # an allocation: no kernel
    assert dict(counter.ops) == {"add.Tensor": 1, "clone.default": 1, "empty.memory_format": 1}
    assert counter.kernels == 2
