"""benchmarks/studies/heap_breakdown.py: glibc's heap read right, each method in new processes, a JSON table."""

import json
import mmap
from pathlib import Path

import pytest
import torch
from conftest import load_script


def _script():
    return load_script("heap_breakdown")


needs_mallinfo2 = pytest.mark.skipif(_script()._mallinfo2() is None, reason="needs glibc's mallinfo2")


@needs_mallinfo2
def test_live_memory_follows_a_tensor_held_and_freed():
    script = _script()
    mallinfo2 = script._mallinfo2()
    before = script.sample(mallinfo2)
    size = 64 * 2**20
    held = torch.ones(size // 4)
    during = script.sample(mallinfo2)
    del held
    after = script.sample(mallinfo2)
    assert during["live"] - before["live"] >= size
    assert during["live"] - after["live"] >= size


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from Linux's /proc")
def test_resident_set_follows_pages_touched():
    # A mapping of its own, in 4 KiB pages touched by this thread: a kernel that counts a thread's page faults in a
    # cache and adds them to the process's resident set every 64 faults reports all but the last few. (A tensor's
    # fill may take a few 2 MiB faults on each of several threads, which such a kernel may not report yet.)
    script = _script()
    size = 64 * 2**20
    before = script._rss()
    region = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, size, mmap.PAGESIZE):
        region[offset] = 1
    during = script._rss()
    region.close()
    assert during - before >= size - 2**20
    assert script._rss() < during


@needs_mallinfo2
def test_heap_breakdown_measures_each_method_in_its_own_processes(tmp_path):
    out = tmp_path / "heap.json"
    _script().main(["--model", "demo", "--size", "64", "--methods", "vanilla", "fast", "--processes", "2",
                    "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert results["processes"] == 2 and set(results["records"]) == {"vanilla", "fast"}
    for records in results["records"].values():
        assert len(records) == 2
        for r in records:
            assert r["samples"] > 100  # entry and exit of every module, two forwards
            assert 0 < r["live_at_rss_peak_mib"] <= r["live_peak_mib"]
            assert r["free_in_heap_at_rss_peak_mib"] >= 0
    for method, median in results["median"].items():
        values = sorted(r["live_peak_mib"] for r in results["records"][method])
        assert median["live_peak_mib"] == pytest.approx(sum(values) / 2)
    table = out.with_suffix(".md").read_text()
    assert "| vanilla |" in table and "| fast |" in table and "median of 2 new processes" in table


def test_heap_breakdown_refuses_unknown_methods_and_no_processes(tmp_path):
    script = _script()
    if script._mallinfo2() is None:
        with pytest.raises(SystemExit):  # a clear refusal before anything else
            script.main(["--out", str(tmp_path / "x.json")])
        return
    with pytest.raises(SystemExit):
        script.main(["--methods", "vanilla", "fastest", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        script.main(["--processes", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        script.main(["--methods", "vanilla"])  # no --out
    assert not (tmp_path / "x.json").exists()
