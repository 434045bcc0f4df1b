"""Smoke test of ``benchmarks/run.py`` (``make bench``): every benchmark code path at a tiny size
and the structure of what it reports. Timing and memory *values* are not asserted -- they
measure the machine, and at these sizes they are noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("torch")

from benchmarks import report, run

REPEATS = 2
REPO = Path(__file__).resolve().parents[1]


def _finite_positive(summary: dict) -> bool:
    return summary["n"] == REPEATS and all(math.isfinite(v) and v > 0 for v in summary["values"])


# Tracing a dozen Trainers/models (each benchmark variant once) is what takes the time.
@pytest.mark.slow
def test_quick_run_reports_every_section() -> None:
    results = run.run_benchmarks(
        sizes=run.QUICK,
        parts=run.PARTS,
        frameworks=("tf", "torch"),
        repeats=REPEATS,
        memory_repeats=1,
        threads=None,  # leave this test session's TensorFlow/torch configuration alone
        memory_worker_fn=run.memory_worker,  # in-process; the subprocess path is checked below
        memory_jobs=1,
    )
    sections = results["sections"]
    assert set(sections) == set(run.PARTS) and results["skipped"] == {}

    accumulation = sections["accumulation"]
    assert set(accumulation["variants"]) == set(run.ACCUMULATION_LABELS)
    # QUICK: 24 examples, b=4, k=2 -> 6 micro-batches -> 3 windows; one batch of 8 -> 3 updates.
    updates = {k: v["updates_per_epoch"] for k, v in accumulation["variants"].items()}
    assert updates["trainer_kxb"] == 3 and updates["trainer_1xb"] == 6
    assert updates["trainer_1xkb"] == 3 and updates["keras_fit_kxb"] == 3
    assert [r["label"] for r in accumulation["ratios"]] == [
        r.label for r in run.ACCUMULATION_RATIOS
    ]
    for ratio in accumulation["ratios"]:
        assert _finite_positive(ratio["cpu"]) and _finite_positive(ratio["wall"])
        assert (ratio["verdict"] is None) == (ratio["goal"] is None)

    (penalty,) = sections["penalty"]["models"]
    assert [r["numerator"] for r in penalty["ratios"]] == list(run.QUICK.penalties)
    for ratio in penalty["ratios"]:
        untimed = ratio["numerator"] in run.QUICK.penalty[0].untimed
        assert ratio["timed"] is not untimed
        assert ("cpu" in ratio) is not untimed
        assert ratio["verdict"] in ("met", "missed", "inconclusive")
        # A difference of two timings (with minus without the penalty): at QUICK sizes on a loaded
        # machine it can come out negative, so only its presence and finiteness are asserted.
        assert math.isfinite(ratio["evidence"]["penalty_us"]["wall"])
    scopes = {r["numerator"]: r["evidence"]["scope"] for r in penalty["ratios"]}
    assert scopes["OrthogonalRegularizer(columns)"].startswith("Dense kernels")
    assert scopes["L1"] == "all kernels"

    memory = sections["memory"]["frameworks"]
    assert set(memory) == {"tf", "torch"}
    for entry in memory.values():
        assert list(entry["configs"]) == ["1×b", "k×b", "1×(k·b)"]
        assert all(c["rss_delta_mib"]["min"] >= 0 for c in entry["configs"].values())
        assert entry["ratios"]["rss_delta_mib"]["verdict"] in ("met", "missed")

    # One trace of each step function, after 2 updates and after 5 (short micro-batch, short
    # window and a stop/resume mid-epoch in between).
    retracing = sections["retracing"]
    assert retracing["trace_counts"] == {
        "2": {"apply": 1, "micro": 1},
        "5": {"apply": 1, "micro": 1},
    }
    assert retracing["constant"] is True

    markdown = report.render(results)
    assert sections["distributed"]["one_collective_per_dtype"] is True  # detailed below
    headings = ("## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Goals missed")
    for heading in headings:
        assert heading in markdown
    assert results["machine"]["cpu"] and results["machine"]["tensorflow"]
    json.loads(json.dumps(results))


def test_memory_worker_runs_in_a_fresh_process() -> None:
    spec = {
        "framework": "torch",
        "device": "cpu",
        "input_size": 8,
        "batch_size": 4,
        "accumulation_steps": 2,
        "examples": 8,
        "threads": 1,
    }
    result = run.run_worker(spec)
    assert set(result) == {"rss_delta_mib", "rss_before_mib", "peak_reset"}
    assert result["rss_delta_mib"] >= 0 and result["rss_before_mib"] > 0


def test_torch_only_run_needs_no_tensorflow(tmp_path: Path) -> None:
    # A GPU machine may have torch and no TensorFlow: `--frameworks torch` must not import it.
    out = tmp_path / "torch.json"
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "from benchmarks import run\n"
        f"run.main(['--quick', '--frameworks', 'torch', '--parts', 'accumulation,penalty', "
        f"'--json', {str(out)!r}])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    variants = set(results["sections"]["accumulation"]["variants"])
    assert variants == {"torchref_kxb", "torchref_1xb", "torchref_1xkb", "torch_loop_kxb"}
    assert set(results["skipped"]) == {"penalty"} and "tensorflow" not in results["machine"]


def test_distributed_tf_counts_one_collective_per_dtype_per_update() -> None:
    # distributed_tf.py in its own process (the logical devices exist before TensorFlow starts).
    section = run.bench_distributed(run.QUICK, REPEATS)
    (row,) = section["rows"]
    assert row["replicas"] == 2
    assert row["micro_batches_per_replica"] == {"mirrored_2x": 2, "one_device_1x": 4}
    # Per replica and update: the float32 gradient sums and the float64 count/loss sums, one
    # all-reduce each; nothing per micro-batch; each step function traced once.
    assert row["collectives_per_update"] == {"float32": 1, "float64": 1}
    assert row["collectives_per_micro_batch"] == 0
    assert row["trace_counts"] == {"apply": 1, "micro": 1}
    assert section["one_collective_per_dtype"] is True
    assert all(_finite_positive(row["ratio"][c]) for c in run.CLOCKS)
    markdown = "\n".join(report._distributed(section))
    assert "| 8x8x1 | 32 | 2 / 4 |" in markdown and "1 float32, 1 float64 | 0 |" in markdown


# benchmarks/proximal.py (issue 16's prox, ISTA and OrthogonalRegularizer ratios): every part at
# a tiny size, with the baseline-kernel variants (here the current kernel file itself).
@pytest.mark.slow
def test_proximal_benchmark_reports_every_ratio() -> None:
    from benchmarks import proximal

    baseline = str(REPO / "tfreg_core" / "proximal.py")
    results = {
        "machine": run.machine_info(("tf", "torch"), "cpu"),
        "load": {"before": [0.0, 0.0, 0.0], "after": [0.0, 0.0, 0.0]},
        "repeats": REPEATS,
        "rounds": 1,
        "prox": proximal.bench_prox(8, 16, 8, REPEATS, 1, baseline),
        "ista": proximal.bench_ista(REPEATS, 1, 2),
        "orthogonal": proximal.bench_orthogonal(8, 16, 8, REPEATS, 1),
    }
    expected = {
        "prox": 6,  # per twin: prox / none, baseline prox / none, prox / baseline prox
        "ista": 4,
        "orthogonal": 2,
    }
    for part, count in expected.items():
        ratios = results[part]["ratios"]
        assert len(ratios) == count, part
        for ratio in ratios.values():
            assert _finite_positive(ratio["cpu"]) and _finite_positive(ratio["wall"])
    text = proximal.markdown(results, "cpu")
    assert "tfreg.Trainer / torchref.Trainer" in text
    assert "tfreg / Keras OrthogonalRegularizer(rows)" in text
