"""Verify a reference bundle recorded by TensorFlow (``tfreg_harness.keras_side.record``) with
torchref.

Runs where TensorFlow is absent -- a GPU image with torch only, say::

    python -m torchref.verify reference.npz --device cuda --json verify.json

Every case is recomputed with torchref on ``--device`` and compared with the recorded values at
the tolerance the bundle's claim names (``tfreg_harness.tolerances``). A case of kind ``"pair"``
(``tfreg-parity --model ... --record``) rebuilds *your* torch module from the importable factory
the bundle names (``module:function``, imported without TensorFlow), loads the recorded weights
and checks its outputs, loss, gradients and optimizer steps against TensorFlow's.

The whole bundle is validated before anything runs (sizes bounded before decompression, every
field's type, every array's shape, known kinds/claims/dtypes, bounded epochs and steps, the
factories importable), so a malformed bundle is one line and status 2, never a traceback and
never a partial run.

Exit status:

- 0: every case passed, and the bundle held at least one;
- 1: a case failed or errored, the bundle holds no case (nothing verified is not a pass), or the
  run exceeded ``--timeout``;
- 2: usage error or unusable input: the bundle cannot be read, is malformed or too large, names a
  torch factory that cannot be imported; an output path cannot be written; ``--device cuda``
  without CUDA;
- 130: interrupted (SIGINT); no output file is left half-written.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfreg_harness import architecture
from tfreg_harness.bundle import MAX_BUNDLE_BYTES, BundleError, Case, load_bundle
from tfreg_harness.compare import Comparison, compare, compare_floored
from tfreg_harness.deadline import DEFAULT_TIMEOUT_S, timeout_seconds
from tfreg_harness.exits import guarded, one_line, unusable
from tfreg_harness.factories import FactorySpecError, import_factory
from tfreg_harness.outputs import (
    REPORT_OUTPUTS,
    OutputPathError,
    add_report_outputs,
    check_output_paths,
    write_text_atomic,
)
from tfreg_harness.report import Report, Row
from tfreg_harness.tolerances import resolve_rtol, tolerance, zero_atol
from tfreg_harness.torch_side.architecture import build_model
from torchref import regularizers
from torchref._compat import torch

PROG = "python -m torchref.verify"
# Bounds on the work a bundle may ask for: far above what tfreg records (2 epochs, a few steps),
# far below a run that would hang CI (a hostile epochs=1e9).
MAX_EPOCHS = 1000
MAX_STEPS = 1000
MAX_EXAMPLES_SEEN = 10_000_000  # epochs x examples of one train case
# The torch loss each recorded "pair" case may name (torchref.training.per_example_loss names;
# the torch halves of tfreg_harness.keras_side.models.LOSS_PAIRS).
PAIR_LOSSES = ("cross_entropy", "binary_cross_entropy_with_logits", "mse")


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


# --------------------------------------------------------------------------------------------
# Validation: what each kind needs from a case, checked before anything runs
# --------------------------------------------------------------------------------------------


def _array(case: Case, key: str, shape: Sequence[int] | None = None, kind: str = "f") -> np.ndarray:
    """``case.arrays[key]``, checked: kind "f" is the case's float dtype, "i" any integer dtype,
    "n" any numeric; ``shape`` exact when given."""
    if key not in case.arrays:
        raise BundleError(f"{case.name}: no array {key!r}")
    value = case.arrays[key]
    if kind == "f" and value.dtype != np.dtype(case.dtype):
        raise BundleError(f"{case.name}: array {key!r} is {value.dtype}, not {case.dtype}")
    if kind == "i" and value.dtype.kind not in "iu":
        raise BundleError(f"{case.name}: array {key!r} is {value.dtype}, not an integer array")
    if shape is not None and value.shape != tuple(shape):
        raise BundleError(
            f"{case.name}: array {key!r} has shape {value.shape}, expected {tuple(shape)}"
        )
    return value


def _param(case: Case, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in case.params:
        raise BundleError(f"{case.name}: no parameter {key!r}")
    value = case.params[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise BundleError(f"{case.name}: parameter {key}={value!r} is not {names}")
    return value


def _int_param(case: Case, key: str, low: int, high: int) -> int:
    value: int = _param(case, key, int)
    if not low <= value <= high:
        raise BundleError(f"{case.name}: parameter {key}={value} is outside [{low}, {high}]")
    return value


def _float_param(case: Case, key: str) -> float:
    value = float(_param(case, key, (int, float)))
    if not (math.isfinite(value) and value > 0):
        raise BundleError(f"{case.name}: parameter {key}={value!r} is not a finite number > 0")
    return value


def _validate_penalty(case: Case) -> None:
    spec = _param(case, "torchref", list)
    if len(spec) != 2 or not isinstance(spec[0], str) or not isinstance(spec[1], dict):
        raise BundleError(f"{case.name}: parameter torchref={spec!r} is not [class name, kwargs]")
    if spec[0] not in regularizers.__all__ or not isinstance(getattr(regularizers, spec[0]), type):
        raise BundleError(f"{case.name}: unknown regularizer {spec[0]!r}")
    try:
        getattr(regularizers, spec[0])(**spec[1])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{case.name}: {spec[0]}(**{spec[1]!r}) is invalid: {exc}") from None
    transpose = _param(case, "transpose", bool)
    w = _array(case, "w")
    if transpose and w.ndim != 2:
        raise BundleError(f"{case.name}: transpose needs a 2-d 'w', got shape {w.shape}")
    _array(case, "value", ())
    _array(case, "grad", w.shape)


def bundle_spec(layers: list[list[Any]], case: Case) -> tuple[tuple[Any, ...], tuple[int]]:
    """The bundle's layer list (``["linear", in, out]``, ``["relu"]``) as the shared
    ``tfreg_harness.architecture`` description and its input shape, so the torch model is built
    by the same code (``tfreg_harness.torch_side.architecture``) as the harness' own torch side."""
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


def _mlp_shapes(case: Case) -> tuple[int, int, list[tuple[int, ...]]]:
    """(input width, classes, torch parameter shapes) of the case's layer list, checked without
    building anything (a hostile width must not allocate)."""
    layers = _param(case, "layers", list)
    if not layers or not all(isinstance(layer, list) and layer for layer in layers):
        raise BundleError(f"{case.name}: parameter layers={layers!r} is not a list of layers")
    shapes: list[tuple[int, ...]] = []
    width: int | None = None
    for layer in layers:
        if layer == ["relu"] and width is not None:
            continue
        sizes = layer[1:]
        if layer[0] != "linear" or len(sizes) != 2 or not all(type(n) is int for n in sizes):
            raise BundleError(f"{case.name}: unknown layer {layer!r} (or relu first)")
        fan_in, fan_out = sizes
        if fan_in < 1 or fan_out < 1 or (width is not None and fan_in != width):
            raise BundleError(f"{case.name}: layer {layer!r} does not follow width {width}")
        shapes += [(fan_out, fan_in), (fan_out,)]
        width = fan_out
    assert width is not None  # the loop saw at least one linear layer (relu first is refused)
    return int(layers[0][1]), width, shapes


def _validate_mlp_inputs(case: Case, fan_in: int, classes: int, prefixes: Sequence[str]) -> int:
    _, _, shapes = _mlp_shapes(case)
    x = _array(case, "x")
    if x.ndim != 2 or x.shape[1] != fan_in or x.shape[0] < 1:
        raise BundleError(f"{case.name}: array 'x' has shape {x.shape}, expected (n, {fan_in})")
    y = _array(case, "y", (x.shape[0],), kind="i")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise BundleError(f"{case.name}: labels in 'y' outside [0, {classes})")
    for prefix in prefixes:
        for i, shape in enumerate(shapes):
            _array(case, f"{prefix}{i}", shape)
    return int(x.shape[0])


def _validate_mlp(case: Case) -> None:
    fan_in, classes, _ = _mlp_shapes(case)
    n = _validate_mlp_inputs(case, fan_in, classes, ("param", "grad"))
    _array(case, "logits", (n, classes))
    _array(case, "loss", ())


def _validate_train_mlp(case: Case) -> None:
    fan_in, classes, _ = _mlp_shapes(case)
    n = _validate_mlp_inputs(case, fan_in, classes, ("param", "final"))
    _array(case, "sample_weight", (n,))
    _float_param(case, "lr")
    _int_param(case, "accumulation_steps", 1, n)
    _int_param(case, "batch_size", 1, n)
    epochs = _int_param(case, "epochs", 1, MAX_EPOCHS)
    if epochs * n > MAX_EXAMPLES_SEEN:
        raise BundleError(
            f"{case.name}: epochs={epochs} x {n} examples exceeds {MAX_EXAMPLES_SEEN} examples"
        )


# --------------------------------------------------------------------------------------------
# Recomputation
# --------------------------------------------------------------------------------------------


def build_mlp(layers: list[list[Any]], case: Case, prefix: str, device: str) -> torch.nn.Sequential:
    """``nn.Sequential`` from the bundle's layer list, loaded with ``{prefix}{i}`` arrays (torch
    layout: weight, bias per Linear)."""
    spec, input_shape = bundle_spec(layers, case)
    module = build_model(spec, input_shape, dtype=case.dtype, device=torch_device(device))
    with torch.no_grad():
        for i, param in enumerate(module.parameters()):
            param.copy_(torch.as_tensor(case.arrays[f"{prefix}{i}"]))
    return module


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


# --------------------------------------------------------------------------------------------
# "pair": a team's own torch module, rebuilt from the factory the bundle names
# --------------------------------------------------------------------------------------------


class FactoryError(BundleError):
    """The torch factory a "pair" case names cannot be imported or broke its contract."""


def load_torch_factory(spec: str) -> Callable[..., Any]:
    """Import ``"pkg.module:function"`` (:func:`tfreg_harness.factories.import_factory`);
    :class:`FactoryError` naming it otherwise."""
    try:
        return import_factory(spec, option="torch factory")
    except FactorySpecError as exc:
        raise FactoryError(str(exc)) from None


def make_torch(factory: Callable[..., Any], spec: str, device: str) -> tuple[Any, Any]:
    """``(module, optimizer or None)`` from a torch factory: it returns an ``nn.Module`` or a dict
    ``{"torch_module": ..., "torch_optimizer": ...}``; called as ``factory(device=...)`` when it
    takes ``device``, else ``factory()`` (the module is then moved to ``device``)."""
    try:
        takes_device = "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_device = False
    try:
        made = factory(device=torch_device(device)) if takes_device else factory()
    except (Exception, SystemExit) as exc:
        raise FactoryError(f"torch factory {spec!r} raised {one_line(exc)}") from None
    module, optimizer = (
        (made.get("torch_module"), made.get("torch_optimizer"))
        if isinstance(made, dict)
        else (made, None)
    )
    if not isinstance(module, torch.nn.Module):
        raise FactoryError(
            f"torch factory {spec!r} returned {type(made).__name__}; expected an nn.Module or "
            "a dict with 'torch_module' (and 'torch_optimizer' for recorded steps)"
        )
    if not takes_device:
        module.to(torch_device(device))
    return module, optimizer


def pair_keys(case: Case, prefix: str) -> list[str]:
    """The torch names recorded under ``prefix/`` (state dict entries, gradients, a step)."""
    return sorted(k.removeprefix(prefix) for k in case.arrays if k.startswith(prefix))


def _validate_pair(case: Case) -> None:
    load_torch_factory(_param(case, "torch_factory", str))
    loss = _param(case, "loss", str)
    if loss not in PAIR_LOSSES:
        raise BundleError(f"{case.name}: loss {loss!r} is not one of {PAIR_LOSSES}")
    steps = _int_param(case, "steps", 0, MAX_STEPS)
    if case.params.get("rtol") is not None:
        rtol = float(_param(case, "rtol", (int, float)))
        if not (math.isfinite(rtol) and rtol >= 0):
            raise BundleError(f"{case.name}: parameter rtol={rtol!r} is not finite and >= 0")
    _array(case, "x", kind="n")
    _array(case, "y", kind="n")
    _array(case, "logits")
    _array(case, "loss", ())
    state = pair_keys(case, "state/")
    grads = pair_keys(case, "grad/")
    if not state or not grads or not set(grads) <= set(state):
        raise BundleError(f"{case.name}: needs 'state/NAME' arrays and 'grad/NAME' of them")
    for name in grads:
        _array(case, f"grad/{name}", case.arrays[f"state/{name}"].shape)
    for step in range(1, steps + 1):
        if pair_keys(case, f"step{step}/") != grads:
            raise BundleError(f"{case.name}: step {step} must record the parameters {grads}")
        for name in grads:
            _array(case, f"step{step}/{name}", case.arrays[f"state/{name}"].shape)


def _verify_pair(case: Case, device: str) -> list[Comparison]:
    from torchref.training import per_example_loss

    spec = case.params["torch_factory"]
    module, optimizer = make_torch(load_torch_factory(spec), spec, device)
    steps = case.params["steps"]
    if steps and optimizer is None:
        raise FactoryError(
            f"torch factory {spec!r}: the bundle records {steps} steps; return "
            "{'torch_module': ..., 'torch_optimizer': ...}"
        )
    state = module.state_dict()
    recorded = pair_keys(case, "state/")
    if sorted(state) != recorded:
        raise ValueError(
            f"the module from {spec} has state {sorted(set(state) ^ set(recorded))} that the "
            "recording does not match (another architecture?)"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != case.arrays[f"state/{name}"].shape:
            raise ValueError(
                f"{name}: torch shape {tuple(tensor.shape)} vs recorded "
                f"{case.arrays[f'state/{name}'].shape}"
            )
    dev = torch_device(device)
    module.load_state_dict({k: torch.as_tensor(case.arrays[f"state/{k}"]) for k in recorded})
    module.eval()
    x = torch.as_tensor(case.arrays["x"], device=dev)
    target = torch.as_tensor(case.arrays["y"], device=dev)
    loss_fn = per_example_loss(case.params["loss"])
    params = dict(module.named_parameters())
    grads = pair_keys(case, "grad/")

    def evaluate() -> tuple[Any, Any]:
        module.zero_grad(set_to_none=True)
        out = module(x)
        labels = target.to(out.dtype) if target.is_floating_point() else target
        value = loss_fn(out, labels).mean()
        value.backward()
        return out, value

    claim_rtol = case.params.get("rtol")
    rtol = resolve_rtol(case.claim, case.dtype, claim_rtol)
    logits, value = evaluate()
    expected_grads = {name: case.arrays[f"grad/{name}"] for name in grads}
    atol = zero_atol(case.dtype, expected_grads.values())

    def host(tensor: Any) -> np.ndarray:
        return np.asarray(tensor.detach().cpu().numpy())

    def grad_of(name: str) -> np.ndarray:
        grad = params[name].grad
        return np.zeros_like(expected_grads[name]) if grad is None else host(grad)

    out = [
        compare("logits", host(logits), case.arrays["logits"], rtol=rtol),
        compare("loss", host(value), case.arrays["loss"], rtol=rtol),
    ]
    out += [
        compare_floored(f"grad {n}", grad_of(n), expected_grads[n], rtol=rtol, atol=atol)
        for n in grads
    ]
    if steps:
        step_rtol = resolve_rtol("trajectory", case.dtype, claim_rtol)
        step_atol = zero_atol(case.dtype, (case.arrays[f"state/{n}"] for n in grads))
        for step in range(1, steps + 1):
            if step > 1:
                evaluate()
            optimizer.step()
            out += [
                compare_floored(
                    f"step {step} {n}",
                    host(params[n]),
                    case.arrays[f"step{step}/{n}"],
                    rtol=step_rtol,
                    atol=step_atol,
                )
                for n in grads
            ]
    return out


@dataclass(frozen=True)
class Verifier:
    """What a case kind needs (``validate``: raises :class:`BundleError`, runs nothing heavy)
    and how torchref recomputes it (``run``)."""

    validate: Callable[[Case], None]
    run: Callable[[Case, str], list[Comparison]]


VERIFIERS: dict[str, Verifier] = {
    "penalty": Verifier(_validate_penalty, _verify_penalty),
    "mlp": Verifier(_validate_mlp, _verify_mlp),
    "train_mlp": Verifier(_validate_train_mlp, _verify_train_mlp),
    "pair": Verifier(_validate_pair, _verify_pair),
}


def validate_cases(cases: Sequence[Case]) -> None:
    """Raise :class:`BundleError` for the first case this verifier cannot run as recorded."""
    for case in cases:
        verifier = VERIFIERS.get(case.kind)
        if verifier is None:
            raise BundleError(
                f"{case.name}: unknown kind {case.kind!r}; known: {sorted(VERIFIERS)}"
            )
        verifier.validate(case)


def verify_bundle(path: str, *, device: str = "cpu") -> Report:
    """Load the bundle at ``path``, validate it (:class:`BundleError`) and :func:`verify_cases`."""
    cases, _meta = load_bundle(path)
    validate_cases(cases)
    return verify_cases(cases, device=device)


def verify_cases(cases: Sequence[Case], *, device: str = "cpu") -> Report:
    """Recompute every (validated) case on ``device``: a pass/fail row each, an "error" row for
    a case whose recomputation raised (a crash inside the torch module, say)."""
    report = Report()
    for case in cases:
        try:
            comparisons = VERIFIERS[case.kind].run(case, device)
        except (Exception, SystemExit) as exc:  # the report shows it; the run goes on
            report.extend([Row(case.name, case.dtype, device, "error", detail=one_line(exc))])
            continue
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
                    tolerance=max(c.rtol for c in comparisons),
                    detail=", ".join(failing),
                )
            ]
        )
    return report


_EPILOG = f"""\
exit status:
  0    every case passed, and the bundle held at least one
  1    a case failed or errored; the bundle holds no case; the run exceeded --timeout
  2    usage error or unusable input: unreadable, malformed or oversized bundle, a torch
       factory that cannot be imported, an output path that cannot be written
  130  interrupted (Ctrl-C); no output file is left half-written

limits: bundles above --max-bundle-mb (default {MAX_BUNDLE_BYTES >> 20}) are refused before
decompression; a case may ask for at most {MAX_EPOCHS} epochs / {MAX_STEPS} steps.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check torchref against a bundle of TensorFlow results (no TensorFlow needed).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", help="a .npz written by `tfreg-parity --record PATH`")
    parser.add_argument("--device", default="cpu", help='torch device: "cpu", "cuda", "gpu"')
    add_report_outputs(parser, testcase="case")
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"stop a run that takes longer (exit 1; default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--max-bundle-mb",
        type=float,
        default=MAX_BUNDLE_BYTES >> 20,
        metavar="MB",
        help="refuse bundles declaring more uncompressed data (default %(default)g)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (math.isfinite(args.max_bundle_mb) and args.max_bundle_mb > 0):
        parser.error(f"--max-bundle-mb must be > 0. Received: {args.max_bundle_mb}")
    try:
        check_output_paths(args, REPORT_OUTPUTS)
    except OutputPathError as exc:
        return _error(str(exc))
    if torch_device(args.device).startswith("cuda"):
        # Parity needs full-precision float32 matmuls; torch's cuDNN convolutions default to TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    return guarded(PROG, lambda: _run(args), timeout=args.timeout, what=f"{PROG} {args.bundle}")


def _error(message: str) -> int:
    return unusable(PROG, message)


def _run(args: argparse.Namespace) -> int:
    try:
        cases, _meta = load_bundle(args.bundle, max_bytes=int(args.max_bundle_mb * (1 << 20)))
    except (OSError, BundleError) as exc:
        # Unreadable input is a usage error (2), not a failed check (1): CI must tell them apart.
        return _error(f"cannot read the bundle: {exc}")
    try:
        validate_cases(cases)
    except BundleError as exc:
        return _error(f"{args.bundle}: {exc}")
    report = verify_cases(cases, device=args.device)
    print(report.to_text())
    counts = report.counts()
    print(f"\n{counts['pass']} passed, {counts['fail'] + counts['error']} failed")
    status = 0 if report.ok else 1
    if not cases:
        status = 1
        print(f"{PROG}: the bundle holds no case: nothing was verified", file=sys.stderr)
    try:
        if args.markdown is not None:
            report.write_markdown(args.markdown)
        if args.junit_xml is not None:
            from tfreg_harness.junit import write_junit_xml

            write_junit_xml(report, args.junit_xml, suite="torchref.verify")
    except OSError as exc:  # checked before the run; a disk that filled up since
        status = _error(f"cannot write an output: {exc}")
    if args.json is not None:
        # Last, so that its exit_status is the one this run returns.
        data = report.as_dict() | {"ok": status == 0, "exit_status": status}
        try:
            write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            status = _error(f"--json {args.json}: {exc}")
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
