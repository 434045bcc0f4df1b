"""Verify a reference bundle recorded by TensorFlow (``tfreg.parity.record``) with torchref.

Runs where TensorFlow is absent -- a GPU image with torch only, say::

    python -m torchref.verify reference.npz --device cuda --json verify.json

Every case is recomputed with torchref on ``--device`` and compared with the recorded values at
the tolerance the bundle's claim names (``tfreg_harness.tolerances``). Exit status 0 when all pass,
1 when a case fails, 2 for usage errors and a bundle that cannot be read (missing, not a bundle).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tfreg_harness import architecture
from tfreg_harness.bundle import Case, load_bundle
from tfreg_harness.compare import Comparison, compare
from tfreg_harness.report import Report, Row
from tfreg_harness.tolerances import tolerance
from torchref import regularizers
from torchref._compat import torch
from torchref.architecture import build_model


def torch_device(device: str) -> str:
    """Accept "gpu" as an alias of "cuda"; anything else is passed to torch as is."""
    return "cuda" if device == "gpu" else device


def penalty_value_and_grad(
    class_name: str, kwargs: dict[str, Any], w: np.ndarray, *, transpose: bool, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """torchref penalty value and gradient of ``w`` (given in TF layout; ``transpose`` maps a
    Dense kernel (in, out) to Linear's (out, in)); the gradient comes back in TF layout."""
    reg = getattr(regularizers, class_name)(**kwargs)
    x = torch.tensor(
        w.T.copy() if transpose else w, device=torch_device(device), requires_grad=True
    )
    value = reg(x)
    (grad,) = torch.autograd.grad(value, x)
    grad_np = grad.detach().cpu().numpy()
    return value.detach().cpu().numpy(), grad_np.T if transpose else grad_np


def _verify_penalty(case: Case, device: str) -> list[Comparison]:
    class_name, kwargs = case.params["torchref"]
    value, grad = penalty_value_and_grad(
        class_name, kwargs, case.arrays["w"], transpose=case.params["transpose"], device=device
    )
    rtol = tolerance(case.claim, case.dtype).rtol
    return [
        compare(f"{case.name} value", value, case.arrays["value"], rtol=rtol),
        compare(f"{case.name} grad", grad, case.arrays["grad"], rtol=rtol),
    ]


def bundle_spec(layers: list[list[Any]], case: Case) -> tuple[tuple[Any, ...], tuple[int]]:
    """The bundle's layer list (``["linear", in, out]``, ``["relu"]``) as the shared
    ``tfreg_harness.architecture`` description and its input shape, so the torch model is built
    by the same code (``torchref.architecture``) as the harness' own torch side."""
    spec: list[Any] = []
    for layer in layers:
        if layer[0] == "linear" and len(layer) == 3:
            spec.append(architecture.Dense(int(layer[2])))
        elif list(layer) == ["relu"]:
            spec.append(architecture.ReLU())
        else:
            raise ValueError(f"{case.name}: unknown layer {layer!r} in the bundle")
    if not spec or layers[0][0] != "linear":
        raise ValueError(f"{case.name}: the bundle's layers must start with a linear layer")
    return tuple(spec), (int(layers[0][1]),)


def build_mlp(layers: list[list[Any]], case: Case, prefix: str, device: str) -> torch.nn.Sequential:
    """``nn.Sequential`` from the bundle's layer list, loaded with ``{prefix}{i}`` arrays (torch
    layout: weight, bias per Linear)."""
    spec, input_shape = bundle_spec(layers, case)
    module = build_model(spec, input_shape, dtype=case.dtype, device=torch_device(device))
    with torch.no_grad():
        for i, param in enumerate(module.parameters()):
            param.copy_(torch.as_tensor(case.arrays[f"{prefix}{i}"]))
    return module


def _verify_mlp(case: Case, device: str) -> list[Comparison]:
    from torchref.training import per_example_loss

    module = build_mlp(case.params["layers"], case, "param", device)
    x = torch.as_tensor(case.arrays["x"], device=torch_device(device))
    y = torch.as_tensor(case.arrays["y"], device=torch_device(device))
    logits = module(x)
    loss = per_example_loss("cross_entropy")(logits, y).mean()
    loss.backward()
    rtol = tolerance(case.claim, case.dtype).rtol
    out = [
        compare("logits", logits.detach().cpu().numpy(), case.arrays["logits"], rtol=rtol),
        compare("loss", loss.detach().cpu().numpy(), case.arrays["loss"], rtol=rtol),
    ]
    for i, param in enumerate(module.parameters()):
        assert param.grad is not None  # every parameter of the MLP feeds the loss
        out.append(
            compare(f"grad{i}", param.grad.cpu().numpy(), case.arrays[f"grad{i}"], rtol=rtol)
        )
    return out


def _verify_train_mlp(case: Case, device: str) -> list[Comparison]:
    from torchref.training import Trainer

    module = build_mlp(case.params["layers"], case, "param", device)
    trainer = Trainer(
        module,
        "cross_entropy",
        torch.optim.SGD(module.parameters(), lr=case.params["lr"]),
        accumulation_steps=case.params["accumulation_steps"],
    )
    trainer.fit(
        case.arrays["x"],
        case.arrays["y"],
        batch_size=case.params["batch_size"],
        epochs=case.params["epochs"],
        shuffle=False,
        sample_weight=case.arrays["sample_weight"],
        verbose=0,
    )
    rtol = tolerance(case.claim, case.dtype).rtol
    return [
        compare(f"final{i}", param.detach().cpu().numpy(), case.arrays[f"final{i}"], rtol=rtol)
        for i, param in enumerate(module.parameters())
    ]


VERIFIERS: dict[str, Callable[[Case, str], list[Comparison]]] = {
    "penalty": _verify_penalty,
    "mlp": _verify_mlp,
    "train_mlp": _verify_train_mlp,
}


def verify_bundle(path: str, *, device: str = "cpu") -> Report:
    """Load the bundle at ``path`` and :func:`verify_cases` it."""
    cases, _meta = load_bundle(path)
    return verify_cases(cases, device=device)


def verify_cases(cases: Sequence[Case], *, device: str = "cpu") -> Report:
    """Recompute every case on ``device``; a case of an unknown kind is an "error" row."""
    report = Report()
    for case in cases:
        verifier = VERIFIERS.get(case.kind)
        if verifier is None:
            report.extend(
                [Row(case.name, case.dtype, device, "error", detail=f"unknown kind {case.kind!r}")]
            )
            continue
        comparisons = verifier(case, device)
        failing = [c.name for c in comparisons if not c.passed]
        report.extend(
            [
                Row(
                    case.name,
                    case.dtype,
                    device,
                    "fail" if failing else "pass",
                    max_abs=max(c.max_abs for c in comparisons),
                    max_rel=max(c.max_rel for c in comparisons),
                    tolerance=comparisons[0].rtol,
                    detail=", ".join(failing),
                )
            ]
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchref.verify",
        description="Check torchref against a bundle of TensorFlow results (no TensorFlow needed).",
    )
    parser.add_argument("bundle", help="a .npz written by `tfreg-parity --record PATH`")
    parser.add_argument("--device", default="cpu", help='torch device: "cpu", "cuda", "gpu"')
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report as Markdown")
    parser.add_argument(
        "--junit-xml", metavar="PATH", help="also write JUnit XML (one testcase per case) for CI"
    )
    args = parser.parse_args(argv)
    if torch_device(args.device).startswith("cuda"):
        # Parity needs full-precision float32 matmuls; torch's cuDNN convolutions default to TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    try:
        cases, _meta = load_bundle(args.bundle)
    except (OSError, ValueError) as exc:
        # Unreadable input is a usage error (2), not a failed check (1): CI must tell them apart.
        print(f"{parser.prog}: error: cannot read the bundle: {exc}", file=sys.stderr)
        return 2
    report = verify_cases(cases, device=args.device)
    print(report.to_text())
    counts = report.counts()
    print(f"\n{counts['pass']} passed, {counts['fail'] + counts['error']} failed")
    if args.json:
        report.write_json(args.json)
    if args.markdown:
        report.write_markdown(args.markdown)
    if args.junit_xml:
        from tfreg_harness.junit import write_junit_xml

        write_junit_xml(report, args.junit_xml, suite="torchref.verify")
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
