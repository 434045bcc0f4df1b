"""pytest plugin: a ``parity`` fixture for a team's own Keras model / torch module pairs in CI.

Installed with tfreg (entry point ``tfreg_parity`` in ``pytest11``), so any pytest session in the
environment has it; without installation, load it with
``-p tfreg_harness.keras_side.pytest_plugin``.
Importing it costs nothing: TensorFlow and torch are imported when a test first uses the fixture.

::

    def test_port(parity):
        report = parity.check(keras_model, torch_module, x, y, steps=3,
                              keras_optimizer=..., torch_optimizer=...,
                              rtol={"model_cross/float32": 2e-5})

``parity.check`` is :func:`tfreg.parity.assert_parity` (the test fails with the whole table; a
configuration mismatch is a failure, never a skip) with per-check tolerance overrides. Overrides
name the
tolerance table's claims (``tfreg_harness.tolerances``: ``model_cross`` covers logits, loss and
gradients of a transferred model, ``trajectory`` the weights after ``steps``), as ``"claim"``
(both dtypes) or ``"claim/dtype"``. They come from, the later winning:

1. the ini option ``parity_rtol`` (lines ``claim[/dtype]=rtol``): a team-wide policy;
2. ``@pytest.mark.parity_rtol({...})`` or ``@pytest.mark.parity_rtol(model_cross=1e-6)`` on a
   test, class or module;
3. ``parity.check(..., rtol={...})``. A plain float ``rtol`` is passed to ``check_parity`` as is
   (every comparison at that bound).

``--parity-device gpu`` runs the pairs on the GPU (``parity.device``; ``parity.torch_device`` is
the torch spelling for building the module there); without a GPU visible to both frameworks the
tests *fail*, never pass having checked nothing.

Layering: this module belongs to the Keras side of the harness (the side it drives), but imports
it -- and with it TensorFlow -- only through :func:`_parity_api`, when a test first calls
``parity.check``: pytest loads an entry-point plugin in every session of the environment, and
``tfreg_harness.keras_side``'s ``__init__`` imports nothing, so loading the plugin costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

__all__ = ["ParityChecker", "parity"]

_WHY = "overridden by the parity fixture ({source})"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "parity_rtol",
        type="linelist",
        default=[],
        help="tolerance overrides for the parity fixture, one claim[/dtype]=rtol per line "
        "(e.g. model_cross/float32=2e-5)",
    )
    group = parser.getgroup("tfreg-parity")
    group.addoption(
        "--parity-device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="device the parity fixture checks pairs on (gpu fails when none is visible)",
    )


def _parity_api() -> tuple[Callable[..., Any], Callable[[], list[str]]]:
    """``(assert_parity, available_devices)`` of the Keras side, imported on first use:
    the plugin's only dependency on ``tfreg`` (see the module's docstring)."""
    from tfreg_harness.keras_side.api import assert_parity
    from tfreg_harness.keras_side.devices import available_devices

    return assert_parity, available_devices


def _ini_overrides(config: pytest.Config) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in config.getini("parity_rtol"):
        key, sep, value = line.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise pytest.UsageError(f"parity_rtol: expected claim[/dtype]=rtol, got {line!r}")
    return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "parity_rtol(mapping=None, **claims): tolerance overrides for the parity fixture, "
        "keys 'claim' or 'claim/dtype' of tfreg_harness.tolerances",
    )
    from tfreg_core.validation import InvalidArgumentError
    from tfreg_harness.tolerances import parse_overrides

    try:  # a bad policy fails the session at start, not in every test
        parse_overrides(_ini_overrides(config), why="ini")
    except InvalidArgumentError as exc:
        raise pytest.UsageError(f"parity_rtol: {exc}") from exc


class ParityChecker:
    """What the ``parity`` fixture returns: :meth:`check` and the device the session runs on."""

    def __init__(self, *, overrides: Mapping[str, float], device: str, sources: str) -> None:
        self.overrides = dict(overrides)
        self.device = device
        self.torch_device = {"cpu": "cpu", "gpu": "cuda"}[device]
        self._sources = sources
        self.reports: list[Any] = []  # every passing report of this test, for inspection

    def check(
        self,
        keras_model: Any,
        torch_module: Any,
        x: Any,
        y: Any,
        *,
        rtol: float | Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        """:func:`tfreg.parity.assert_parity` under this test's tolerance overrides; returns the
        report (``tfreg_harness.report.Report``). ``kwargs`` go to ``check_parity``; ``device``
        defaults to ``--parity-device``."""
        __tracebackhide__ = True
        from tfreg_harness.tolerances import tolerance_overrides

        assert_parity, available_devices = _parity_api()

        device = kwargs.pop("device", self.device)
        if device not in available_devices():
            pytest.fail(
                f"parity: device {device!r} requested, but no GPU is visible to both "
                "TensorFlow and torch"
            )
        overrides, sources = self.overrides, self._sources
        if isinstance(rtol, Mapping):
            overrides = {**overrides, **rtol}
            sources = " + ".join(filter(None, [sources, "check(rtol=...)"]))
            rtol = None
        with tolerance_overrides(overrides, why=_WHY.format(source=sources or "none")):
            report = assert_parity(
                keras_model,
                torch_module,
                x,
                y,
                device=device,
                rtol=rtol,
                **kwargs,
            )
        self.reports.append(report)
        return report


@pytest.fixture
def parity(request: pytest.FixtureRequest) -> ParityChecker:
    """Check a Keras model against a torch module: ``parity.check(keras_model, torch_module, x,
    y, **check_parity_kwargs)``; see :mod:`tfreg_harness.keras_side.pytest_plugin`."""
    overrides = _ini_overrides(request.config)
    sources = ["ini parity_rtol"] if overrides else []
    # iter_markers yields the closest marker first; apply the farthest first so the closest wins.
    for marker in reversed(list(request.node.iter_markers("parity_rtol"))):
        for mapping in marker.args:
            overrides |= dict(mapping)
        overrides |= marker.kwargs
        sources.append("@pytest.mark.parity_rtol")
    return ParityChecker(
        overrides=overrides,
        device=request.config.getoption("parity_device"),
        sources=" + ".join(dict.fromkeys(sources)),
    )
