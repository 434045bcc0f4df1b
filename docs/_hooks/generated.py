"""MkDocs hook: the pages' generated parts and the docstring check of the public API.

- ``<!-- generated: differences -->`` and ``<!-- generated: tolerances -->`` in a page become
  tables built from the harness's own data (``tfreg_harness.differences`` /
  ``tfreg_harness.tolerances``), so the site cannot drift from what the checks use.
- Every name in ``__all__`` of the documented packages must have a docstring (read statically by
  griffe, as mkdocstrings reads it): a missing one is a warning, which ``mkdocs build --strict``
  turns into a failed build. mkdocstrings alone would silently leave such a name out.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.generated")

ROOT = Path(__file__).resolve().parents[2]
# package -> its API reference page
PACKAGES = {
    "tfreg": "reference/tfreg.md",
    "tfreg.parity": "reference/tfreg-parity.md",
    "torchref": "reference/torchref.md",
    "tfreg_core": "reference/tfreg-core.md",
    "tfreg_harness": "reference/tfreg-harness.md",
}
ANCHOR = re.compile(r'id="([\w.]+)"')
# The docstrings cite names Sphinx-style (:func:`name`); Markdown renders the role as text.
SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):(?=<code>)")
MARKER = re.compile(r"<!-- generated: (\w+) -->")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def differences_markdown() -> str:
    """The Keras <-> torch differences the harness knows, from ``FRAMEWORK_DIFFERENCES``."""
    from tfreg_harness.differences import FRAMEWORK_DIFFERENCES as D

    lines = [
        "### Tensor layouts",
        "",
        "| tensor | Keras 3 | PyTorch | `np.transpose` axes Keras → torch | torch → Keras |",
        "|---|---|---|---|---|",
    ]
    for kind, layout in D.layouts.items():
        lines.append(
            f"| {kind} | `{layout.keras}` | `{layout.torch}` | `{layout.to_torch}` "
            f"| `{layout.to_keras}` |"
        )
    bn = D.batchnorm
    lines += [
        "",
        "### BatchNormalization ↔ BatchNorm",
        "",
        "| | Keras 3 | PyTorch |",
        "|---|---|---|",
        f"| momentum default | {bn.keras_momentum_default} | {bn.torch_momentum_default} "
        "(= 1 − Keras' m) |",
        f"| epsilon default | {bn.keras_epsilon_default:g} | {bn.torch_epsilon_default:g} |",
        f"| moving variance | `{_cell(bn.keras_moving_variance)}` "
        f"| `{_cell(bn.torch_running_var)}` |",
        "",
        "### Activation constants (visible in float64)",
        "",
        "| constant | TensorFlow keeps | gap to torch's exact formula (float64) |",
        "|---|---|---|",
    ]
    act = D.activations
    lines += [
        f"| exact gelu `1/√2` | {act.gelu_exact_inv_sqrt2!r} (float32) "
        f"| {act.gelu_exact_float64_gap:.1e} |",
        f"| tanh gelu `0.044715` | {act.gelu_tanh_coefficient!r} (float32) "
        f"| {act.gelu_tanh_float64_gap:.1e} |",
        f"| LeakyReLU slope 0.2 | {act.keras_slope(0.2)!r} (float32) "
        f"| {abs(act.keras_slope(0.2) - 0.2) / 0.2:.1e} relative |",
        "",
        "### Every documented difference, as the harness quotes it",
        "",
        "| topic | what differs, and the matching mode |",
        "|---|---|",
    ]
    lines += [f"| `{topic}` | {_cell(text)} |" for topic, text in D.notes.items()]
    return "\n".join(lines)


def tolerances_markdown() -> str:
    """The tolerance table, from ``TOLERANCES`` (claim, dtype, rtol and the reason)."""
    from tfreg_harness.tolerances import TOLERANCES, ZERO_GRADIENT_ULPS

    claims = list(dict.fromkeys(claim for claim, _ in TOLERANCES))
    lines = [
        "| claim | float64 rtol | why (float64) | float32 rtol | why (float32) |",
        "|---|---|---|---|---|",
    ]
    for claim in claims:
        cells = []
        for dtype in ("float64", "float32"):
            entry = TOLERANCES.get((claim, dtype))
            cells += ["—", "—"] if entry is None else [f"{entry.rtol:g}", _cell(entry.why)]
        lines.append(f"| `{claim}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"A gradient that is analytically zero is compared against an absolute bound of "
        f"{ZERO_GRADIENT_ULPS} ulps of its dtype times the model's largest gradient entry "
        "(`tfreg_harness.tolerances.zero_gradient_atol`), not relatively.",
    ]
    return "\n".join(lines)


GENERATORS = {"differences": differences_markdown, "tolerances": tolerances_markdown}


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            log.warning("%s: unknown generated section %r", page.file.src_path, name)
            return match.group(0)
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def undocumented() -> list[str]:
    """The names in ``__all__`` of :data:`PACKAGES` that have no docstring, as griffe (and so
    mkdocstrings) reads them."""
    import griffe  # the docs extra; the table generators above need only tfreg_harness

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    for top in dict.fromkeys(package.split(".")[0] for package in PACKAGES):
        loader.load(top)
    loader.resolve_aliases(implicit=False, external=None)
    missing = []
    for package in PACKAGES:
        missing += _undocumented(loader.modules_collection[package], package)
    return missing


def exports(package: str) -> list[str]:
    """``package.__all__`` as griffe reads it, less ``__version__`` (a string, documented by the
    changelog)."""
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    module = loader.load(package)
    return [name for name in map(str, module.exports or []) if name != "__version__"]


def _undocumented(module: Any, package: str) -> list[str]:
    from griffe import AliasResolutionError, CyclicAliasError

    missing = []
    for name in exports(package):
        try:
            member = module[name]
            docstring = member.docstring
        except (KeyError, AliasResolutionError, CyclicAliasError):
            missing.append(f"{package}.{name} (cannot be resolved)")
            continue
        if docstring is None or not docstring.value.strip():
            missing.append(f"{package}.{name}")
    return missing


def on_pre_build(config: Any, **kwargs: Any) -> None:
    for name in undocumented():
        log.warning("public name without a docstring: %s", name)


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Drop the Sphinx role before a code span (``:func:`x` `` renders as ``x``)."""
    return SPHINX_ROLE.sub("", html)


def on_post_page(output: str, page: Any, **kwargs: Any) -> str:
    """Every public name of a package is rendered on its reference page (an anchor ``pkg.name``,
    or ``pkg.module.name`` where a function shadows its own module, as ``tfreg_harness.compare``
    does)."""
    for package, src in PACKAGES.items():
        if page.file.src_path != src:
            continue
        anchors = set(ANCHOR.findall(output))
        for name in exports(package):
            if f"{package}.{name}" not in anchors and not any(
                a.startswith(f"{package}.") and a.endswith(f".{name}") for a in anchors
            ):
                log.warning("%s: public name %s.%s is not rendered", src, package, name)
    return output
