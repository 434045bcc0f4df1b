"""Markdown (``RESULTS.md``) and a console summary from ``run.run_benchmarks``' results."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def _x(value: float) -> str:
    return f"{value:.3f}×"


def _spread(s: dict[str, Any]) -> str:
    return f"{s['min']:.3f}–{s['max']:.3f}"


def _iqr(s: dict[str, Any]) -> str:
    return f"{s['q1']:.3f}–{s['q3']:.3f}"


def _verdict(entry: dict[str, Any]) -> str:
    if entry.get("verdict") is None:
        return "—"
    return {"met": "**met**", "missed": "**MISSED**"}.get(entry["verdict"], "inconclusive")


def _goal(goal: float | None) -> str:
    return "—" if goal is None else f"≤ {goal:.2f}×"


def _shared_note(machine: dict[str, Any]) -> str | None:
    cores = machine.get("usable_cores") or machine.get("logical_cores") or 1
    busiest = max(machine["load_average_before"][0], machine["load_average_after"][0])
    if busiest < 0.5 * cores:
        return None
    return (
        f"The machine was shared: the 1-minute load average was "
        f"{machine['load_average_before'][0]} before and {machine['load_average_after'][0]} "
        f"after the run on {cores} usable cores, so other processes competed for the CPU "
        "throughout. Ratios come from interleaved repeats (noise hits every variant of a "
        "repeat alike); absolute times are indicative only."
    )


def _machine(results: dict[str, Any]) -> list[str]:
    m, s = results["machine"], results["settings"]
    rows = [
        ("date (UTC)", m["date"]),
        ("CPU", m["cpu"]),
        ("cores (logical / usable)", f"{m['logical_cores']} / {m['usable_cores']}"),
        ("platform", m["platform"]),
        ("Python / NumPy", f"{m['python']} / {m['numpy']}"),
    ]
    if "tensorflow" in m:
        rows.append(("TensorFlow / Keras", f"{m['tensorflow']} / {m['keras']}"))
    if "torch" in m:
        rows.append(("torch", m["torch"]))
    if "gpu" in m:
        rows.append(("GPU (torch)", m["gpu"]))
    rows += [
        ("threads", "; ".join(f"{k}: {v}" for k, v in s["threads"].items())),
        ("timing clock", s["clock"]),
        ("repeats (timing / memory)", f"{s['repeats']} / {s['memory_repeats']}"),
        ("load average before / after", f"{m['load_average_before']} / {m['load_average_after']}"),
        ("run time", f"{m['elapsed_s']} s"),
    ]
    lines = ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    note = _shared_note(m)
    if note:
        lines += ["", note]
    return lines


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table: header, separator, one line per row."""
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _config(config: dict[str, Any]) -> str:
    return "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in config.items())


def _ratio_table(ratios: list[dict[str, Any]], clock: str) -> list[str]:
    other = "wall" if clock == "cpu" else "cpu"
    headers = [
        "ratio",
        "goal",
        f"median ({clock})",
        "min–max",
        "IQR",
        f"median ({other})",
        "verdict",
    ]
    rows = [
        [
            r["label"],
            _goal(r["goal"]),
            _x(r[clock]["median"]),
            _spread(r[clock]),
            _iqr(r[clock]),
            _x(r[other]["median"]),
            _verdict(r),
        ]
        for r in ratios
    ]
    return _table(headers, rows)


def _variant_table(variants: dict[str, Any]) -> list[str]:
    headers = ["variant", "updates / epoch", "µs / example (cpu)", "µs / example (wall)"]
    rows = [
        [
            v["label"],
            v["updates_per_epoch"],
            f"{v['us_per_example_cpu']:.1f}",
            f"{v['us_per_example_wall']:.1f}",
        ]
        for v in variants.values()
    ]
    return _table(headers, rows)


def _accumulation(section: dict[str, Any], clock: str) -> list[str]:
    return [
        "## 1. Accumulation overhead",
        "",
        _config(section["config"]),
        "",
        *_ratio_table(section["ratios"], clock),
        "",
        "Per variant (medians; k×b = accumulation_steps=k at micro-batch b):",
        "",
        *_variant_table(section["variants"]),
    ]


def _penalty(section: dict[str, Any], clock: str) -> list[str]:
    lines = ["## 2. Penalty overhead per update", ""]
    for model in section["models"]:
        lines += [
            f"### {model['config']['input']}, batch {model['config']['batch_size']}",
            "",
            _config(model["config"]),
            "",
        ]
        headers = [
            "regularizer",
            "scope",
            "goal",
            f"median ({clock})",
            "min–max",
            "IQR",
            "verdict",
            "penalty + gradient alone (µs)",
            "update without penalty (µs)",
            "predicted",
        ]
        rows = []
        for r in model["ratios"]:
            ev = r["evidence"]
            measured = ["not timed", "—", "—"]
            if r["timed"]:
                measured = [_x(r[clock]["median"]), _spread(r[clock]), _iqr(r[clock])]
            rows.append(
                [
                    r["numerator"],
                    ev["scope"],
                    _goal(r["goal"]),
                    *measured,
                    _verdict(r),
                    f"{ev['penalty_us'][clock]:.0f}",
                    f"{ev['update_us_without_penalty'][clock]:.0f}",
                    _x(ev["predicted_ratio"][clock]),
                ]
            )
        lines += [*_table(headers, rows), ""]
    lines += [
        "*predicted* = 1 + (penalty and gradient alone, timed inside one graph loop) / (update "
        "without penalty): what the penalty's own arithmetic costs, with no dispatch overhead. "
        "A verdict is *met* when the whole interquartile range is within the goal, *MISSED* when "
        "all of it is above, *inconclusive* when the goal lies inside it (below the noise).",
        "",
        "Where the cost comes from (read from `tfreg/training/window.py` and "
        "`tfreg/regularizers.py`): Trainer evaluates the penalty once per update, inside the "
        "same `tf.function` as the optimizer step (no extra dispatch, no host sync), and "
        "differentiates it with one extra "
        "tape. What remains is the regularizer's own ops, the formulas Keras uses: a few "
        "elementwise ops and a reduction per kernel for L1/L2/L1L2/PNorm/GroupLasso (the zero-safe "
        "root of PNorm/GroupLasso adds two `where`s), each ~1 µs on the tiny kernels of the 8x8 "
        "model, so their share shrinks as the model grows. OrthogonalRegularizer forms the n×n "
        "Gram matrix of the normalised rows (or columns) of each Dense kernel, O(n²·m) per update: "
        "rows mode on a 3136×64 kernel is a 3136×3136 product. Its cost is the formula's "
        "(identical to `keras.regularizers.OrthogonalRegularizer`), not overhead of ours; "
        "`mode='columns'` is the cheap orientation for a tall (in > out) kernel.",
    ]
    return lines


def _memory(section: dict[str, Any]) -> list[str]:
    lines = [
        "## 3. Peak memory: k×b accumulation vs one batch of k·b",
        "",
        _config(section["config"]),
    ]
    for framework, entry in section["frameworks"].items():
        metrics = list(next(iter(entry["configs"].values())))
        lines += ["", f"### {framework} ({entry['device']})", ""]
        if not entry["peak_reset"]:
            lines += ["Peak RSS could not be reset: deltas are upper bounds.", ""]
        lines += _table(
            ["configuration", *(f"{m} median (min–max)" for m in metrics)],
            [
                [
                    label,
                    *(
                        f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"
                        for s in by_metric.values()
                    ),
                ]
                for label, by_metric in entry["configs"].items()
            ],
        )
        rows = []
        for metric, ratios in entry["ratios"].items():
            for name in ("k×b / 1×b", "1×(k·b) / k×b", "1×(k·b) / 1×b"):
                s = ratios[name]
                goal, verdict = ("—", "—")
                if name == "k×b / 1×b":
                    goal, verdict = f"≤ {ratios['goal']:.1f}× (tracks b)", _verdict(ratios)
                rows.append([name, metric, _x(s["median"]), _spread(s), goal, verdict])
        lines += ["", *_table(["ratio", "metric", "median", "min–max", "goal", "verdict"], rows)]
    return lines


def _retracing(section: dict[str, Any]) -> list[str]:
    lines = [
        "## 4. Retracing",
        "",
        _config(section["config"]),
        "",
        *_table(
            ["updates", "apply traces", "micro-batch traces"],
            [[u, c["apply"], c["micro"]] for u, c in section["trace_counts"].items()],
        ),
    ]
    verdict = "**met** (constant)" if section["constant"] else "**MISSED** (the count grew)"
    return [*lines, "", f"Trace count constant over the run: {verdict}."]


def _collectives(counts: dict[str, float]) -> str:
    return ", ".join(f"{n:g} {dtype}" for dtype, n in counts.items())


def _distributed(section: dict[str, Any]) -> list[str]:
    headers = [
        "input",
        "examples / update",
        "micro-batches per device (2 replicas / 1 device)",
        "ms / update, 2 replicas (cpu)",
        "ms / update, 1 device (cpu)",
        "2 replicas / 1 device (cpu)",
        "min–max",
        "IQR",
        "median (wall)",
        "all-reduces / update (per replica)",
        "all-reduces / micro-batch",
    ]
    rows = []
    for r in section["rows"]:
        micro = r["micro_batches_per_replica"]
        rows.append(
            [
                r["input"],
                r["examples_per_update"],
                f"{micro['mirrored_2x']} / {micro['one_device_1x']}",
                f"{1e3 * r['mirrored_2x_s_per_update_cpu']:.1f}",
                f"{1e3 * r['one_device_1x_s_per_update_cpu']:.1f}",
                _x(r["ratio"]["cpu"]["median"]),
                _spread(r["ratio"]["cpu"]),
                _iqr(r["ratio"]["cpu"]),
                _x(r["ratio"]["wall"]["median"]),
                _collectives(r["collectives_per_update"]),
                f"{r['collectives_per_micro_batch']:g}",
            ]
        )
    verdict = "**met**" if section["one_collective_per_dtype"] else "**MISSED**"
    return [
        "## 5. Distributed accumulation (tfreg.Trainer, MirroredStrategy)",
        "",
        _config(section["config"]),
        "",
        *_table(headers, rows),
        "",
        "Each row: `benchmarks/distributed_tf.py` in its own process, the same examples per "
        "update and the same micro-batch per device (the 2-replica trainer's `batch_size` is the "
        "global 2·b), both variants interleaved; the ratio is per update (= per example). "
        "All-reduces: `CollectiveReduceV2` ops per replica in the traced update and "
        "micro-batch functions, by dtype (the update function runs once per update).",
        "",
        f"One all-reduce per dtype per update, none per micro-batch: {verdict}.",
        "",
        "Where the cost comes from: per micro-batch each replica does the one device's work "
        "on b examples, with no collective (last column); once per update come the all-reduces "
        "and the optimizer step, applied to both replicas' copies of the variables. The two "
        "28x28 rows spread that per-update part over 2 and over 32 micro-batches. Process CPU "
        "time counts both replicas' threads, including a thread pool's spinning while the "
        "other core is busy; on a shared machine the wall-clock column cannot show the "
        "replicas running in parallel.",
    ]


def missed_goals(results: dict[str, Any]) -> list[str]:
    """One line per missed goal, with the measured number."""
    clock = results["settings"]["clock"]
    sections = results["sections"]
    out = []
    for r in sections.get("accumulation", {}).get("ratios", []):
        if r["verdict"] in ("missed", "inconclusive"):
            out.append(
                f"{r['verdict']}: {r['label']}: {_x(r[clock]['median'])} "
                f"({_spread(r[clock])}), goal "
                f"{_goal(r['goal'])}"
            )
    for model in sections.get("penalty", {}).get("models", []):
        for r in model["ratios"]:
            if r["verdict"] in ("missed", "inconclusive"):
                ev = r["evidence"]
                measured = "not timed"
                if r["timed"]:
                    measured = f"{_x(r[clock]['median'])} ({_spread(r[clock])})"
                out.append(
                    f"{r['verdict']}: {r['numerator']} on {model['config']['input']}: "
                    f"{measured}, goal "
                    f"{_goal(r['goal'])}; the penalty and its gradient alone cost "
                    f"{ev['penalty_us'][clock]:.0f} µs against a "
                    f"{ev['update_us_without_penalty'][clock]:.0f} µs update "
                    f"(predicts {_x(ev['predicted_ratio'][clock])})"
                )
    for framework, entry in sections.get("memory", {}).get("frameworks", {}).items():
        for metric, ratios in entry["ratios"].items():
            if ratios["verdict"] == "missed":
                out.append(
                    f"missed: memory {framework} {metric}: k×b / 1×b = "
                    f"{_x(ratios['k×b / 1×b']['median'])}"
                )
    if "retracing" in sections and not sections["retracing"]["constant"]:
        out.append(f"retracing: {sections['retracing']['trace_counts']}")
    distributed = sections.get("distributed")
    if distributed is not None and not distributed["one_collective_per_dtype"]:
        counts = [
            (r["collectives_per_update"], r["collectives_per_micro_batch"])
            for r in distributed["rows"]
        ]
        out.append(
            f"missed: one all-reduce per dtype per update: (per update, per micro-batch) {counts}"
        )
    return out


def render(results: dict[str, Any], notes: list[str] | None = None) -> str:
    clock = results["settings"]["clock"]
    sections = results["sections"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python benchmarks/run.py`; `--json PATH` writes the raw "
        "numbers, every repeat included). Do not edit by hand: rerun it.",
        "",
        "Method: every timing is a ratio of two variants measured side by side in one process. "
        "A repeat is a few rounds; each round trains every variant for one epoch, in an order "
        "rotated from round to round, after one untimed warm-up epoch per variant (tracing "
        "excluded). The ratio is taken per repeat; the tables give "
        f"the median ratio over the repeats, min–max and interquartile range. Clock: `{clock}` "
        "(process CPU time with one intra-op thread per framework, so time another process held "
        "the core is not counted; wall-clock medians are shown beside it). Memory: each "
        "configuration in a fresh subprocess. `verbose=0` everywhere.",
        "",
        *_machine(results),
    ]
    if "accumulation" in sections:
        lines += ["", *_accumulation(sections["accumulation"], clock)]
    if "penalty" in sections:
        lines += ["", *_penalty(sections["penalty"], clock)]
    if "memory" in sections:
        lines += ["", *_memory(sections["memory"])]
    if "retracing" in sections:
        lines += ["", *_retracing(sections["retracing"])]
    if "distributed" in sections:
        lines += ["", *_distributed(sections["distributed"])]
    for part, why in results["skipped"].items():
        lines += ["", f"*{part}: skipped ({why}).*"]
    missed = missed_goals(results)
    lines += ["", "## Goals missed or not resolved", ""]
    lines += [f"- {m}" for m in missed] if missed else ["None."]
    return "\n".join(lines) + "\n"


def _penalty_ratio(r: dict[str, Any], clock: str) -> str:
    if r["timed"]:
        return _x(r[clock]["median"])
    return f"{_x(r['evidence']['predicted_ratio'][clock])} (predicted)"


def summary(results: dict[str, Any]) -> str:
    """A few lines for the console."""
    clock = results["settings"]["clock"]
    lines = []
    for r in results["sections"].get("accumulation", {}).get("ratios", []):
        lines.append(f"{r['label']}: {_x(r[clock]['median'])} ({_spread(r[clock])})")
    for model in results["sections"].get("penalty", {}).get("models", []):
        cells = ", ".join(f"{r['numerator']} {_penalty_ratio(r, clock)}" for r in model["ratios"])
        lines.append(f"penalty {model['config']['input']}: {cells}")
    for framework, entry in results["sections"].get("memory", {}).get("frameworks", {}).items():
        cells = ", ".join(
            f"{label} {s['rss_delta_mib']['median']:.1f} MiB"
            for label, s in entry["configs"].items()
        )
        lines.append(f"memory {framework}: {cells}")
    if "retracing" in results["sections"]:
        lines.append(f"trace counts: {results['sections']['retracing']['trace_counts']}")
    for r in results["sections"].get("distributed", {}).get("rows", []):
        lines.append(
            f"MirroredStrategy 2 replicas / 1 device, {r['input']}, {r['examples_per_update']} "
            f"examples per update: {_x(r['ratio']['cpu']['median'])} (cpu); all-reduces per "
            f"update {_collectives(r['collectives_per_update'])}"
        )
    missed = missed_goals(results)
    lines.append("goals missed: " + ("; ".join(missed) if missed else "none"))
    return "\n".join(lines)
