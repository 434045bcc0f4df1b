"""JUnit XML for parity reports: the format CI systems (GitLab, Jenkins, GitHub/Azure test
reporters) render as a test list.

One ``<testsuite>`` per report; one ``<testcase>`` per row (a check at one dtype on one device),
``classname`` ``<suite>.<device>.<dtype>`` so a CI groups rows by where they ran. A ``fail`` row
carries ``<failure>`` (message: max rel diff against the tolerance and the detail), an ``error``
row ``<error>``, a ``skip`` row ``<skipped>`` with its reason. Framework-free: ``tfreg-parity``
and ``torchref.verify`` both write it.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from tfreg_harness.outputs import write_text_atomic
from tfreg_harness.report import Report, Row, format_number

__all__ = ["junit_xml", "write_junit_xml"]


def _message(row: Row) -> str:
    measured = f"max rel {format_number(row.max_rel)} (max abs {format_number(row.max_abs)})"
    bound = f"tolerance {format_number(row.tolerance)}"
    parts = [f"{measured}, {bound}"] if row.max_rel is not None else []
    return "; ".join([*parts, row.detail] if row.detail else parts) or row.status


def junit_xml(
    report: Report,
    *,
    suite: str,
    seconds: Sequence[float | None] | None = None,
    total_seconds: float | None = None,
    properties: Mapping[str, object] | None = None,
) -> str:
    """The report as a JUnit XML document (a string).

    ``seconds[i]`` is row ``i``'s run time (``time`` attribute, 0 when unknown); ``properties``
    (versions, machine) become ``<property>`` elements of the suite.
    """
    if seconds is not None and len(seconds) != len(report.rows):
        raise ValueError(
            f"seconds must have one entry per row: {len(seconds)} for {len(report.rows)} rows"
        )
    counts = report.counts()
    times = [t or 0.0 for t in seconds] if seconds is not None else [0.0] * len(report.rows)
    total = sum(times) if total_seconds is None else total_seconds
    root = ET.Element("testsuites", name=suite)
    testsuite = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(report.rows)),
        failures=str(counts["fail"]),
        errors=str(counts["error"]),
        skipped=str(counts["skip"]),
        time=f"{total:.3f}",
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(),
    )
    if properties:
        props = ET.SubElement(testsuite, "properties")
        for name, value in properties.items():
            ET.SubElement(props, "property", name=name, value=str(value))
    for row, time in zip(report.rows, times, strict=True):
        case = ET.SubElement(
            testsuite,
            "testcase",
            classname=f"{suite}.{row.device}.{row.dtype}",
            name=row.check,
            time=f"{time:.3f}",
        )
        if row.status in ("fail", "error"):
            tag = "failure" if row.status == "fail" else "error"
            element = ET.SubElement(case, tag, message=_message(row), type=f"parity {row.status}")
            element.text = _message(row)
        elif row.status == "skip":
            ET.SubElement(case, "skipped", message=row.detail or "skipped")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit_xml(
    report: Report,
    path: str | Path,
    *,
    suite: str,
    seconds: Sequence[float | None] | None = None,
    total_seconds: float | None = None,
    properties: Mapping[str, object] | None = None,
) -> None:
    """Write :func:`junit_xml` to ``path`` (UTF-8, atomically)."""
    xml = junit_xml(
        report, suite=suite, seconds=seconds, total_seconds=total_seconds, properties=properties
    )
    write_text_atomic(path, xml)
