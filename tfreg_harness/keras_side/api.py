"""Bring-your-own-model parity: compare *your* Keras model with *your* torch module.

::

    from tfreg.parity import assert_parity

    def test_my_model_matches():
        keras_model, torch_module = build_keras(), build_torch()      # same architecture
        assert_parity(keras_model, torch_module, x, y)                 # one pass
        assert_parity(keras_model, torch_module, x, y, steps=5,        # and 5 updates
                      keras_optimizer=keras.optimizers.SGD(0.125),
                      torch_optimizer=torch.optim.SGD(torch_module.parameters(), lr=0.125))

Any built ``keras.Model`` (Sequential, functional, subclassed) and any ``nn.Module``: layers pair
in definition order (``pairing``; override with ``layer_map``), each pair's configuration
is checked by its registered kind (``kinds``), and weights are copied Keras -> torch
(``transfer=False`` keeps the torch weights: test your own converter). The report
compares every paired layer's output, the logits, the loss and every parameter's gradient, and
names the first layer and the first gradient that leave their tolerance; with ``steps``, the
weights after each update, the BatchNorm moving statistics (torch's unbiased running variance
predicted from Keras' biased one) and the eval-mode logits. Tolerances come from
``tfreg_harness.tolerances`` (``model_cross`` for one pass, ``trajectory`` after steps) at the
model's dtype unless ``rtol`` is given. A pairing or configuration mismatch is a *failed* row,
never a skip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg_core.validation import InvalidArgumentError
from tfreg_harness.compare import Comparison, compare, compare_floored
from tfreg_harness.differences import note, torch_running_var_from_keras
from tfreg_harness.divergence import LayerRecord, ParityReport
from tfreg_harness.keras_side.devices import tf_device
from tfreg_harness.keras_side.models import (
    LOSS_PAIRS,
    Evaluation,
    LossSpec,
    ModelPair,
    compare_evaluations,
    compare_layers,
    compare_outputs,
    dropout_masks_for,
    evaluate_keras,
    evaluate_torch,
    forward_keras,
    forward_torch,
    gradient_records,
    keras_outputs,
    loss_terms,
    settle_flatten_orders,
    torch_outputs_in_keras_layout,
)
from tfreg_harness.keras_side.pairing import LayerMatch, PairingError, TorchInput
from tfreg_harness.keras_side.transfer import (
    ParameterPair,
    copy_weights,
    model_dtype,
    trainable_mismatches,
)
from tfreg_harness.report import Row
from tfreg_harness.tolerances import resolve_rtol, zero_atol


def _row(
    found: Comparison | LayerRecord,
    dtype: str,
    device: str,
    detail: str = "",
    *,
    check: str | None = None,
) -> Row:
    """A comparison's or a layer record's row (``check``: its name, else the comparison's)."""
    r = found if isinstance(found, LayerRecord) else LayerRecord.of(found, "", "output")
    return Row(
        check or r.name,
        dtype,
        device,
        "pass" if r.passed else "fail",
        max_abs=r.max_abs,
        max_rel=r.rel,
        tolerance=r.tolerance,
        detail=detail,
    )


def _failures(found: list[tuple[str, str]], dtype: str, device: str) -> list[Row]:
    """A failed row per ``(check, cause)`` a probe found."""
    return [Row(check, dtype, device, "fail", detail=why) for check, why in found]


def _batchnorms(pair: ModelPair) -> list[tuple[LayerMatch, ParameterPair, ParameterPair]]:
    """(match, moving mean pair, moving variance pair) of every paired BatchNormalization."""
    by_variable = {id(p.keras_variable): p for p in pair.parameter_pairs()}
    return [
        (
            m,
            by_variable[id(m.keras_layer.moving_mean)],
            by_variable[id(m.keras_layer.moving_variance)],
        )
        for m in pair.pairing().paired
        if isinstance(m.keras_layer, keras.layers.BatchNormalization)
    ]


def _statistics_rows(
    pair: ModelPair,
    initial: dict[int, np.ndarray],
    passes: int,
    rtol: float,
    device: str,
) -> tuple[list[Row], list[tuple[Any, np.ndarray]]]:
    """Moving mean and variance of every BatchNorm after ``passes`` train-mode batches; returns
    the rows and (Keras variable, value in torch's convention) for the eval comparison."""
    rows, converted = [], []
    for match, mean, var in _batchnorms(pair):
        layer = match.keras_layer
        count = prod(match.context.input_shape[:-1])  # values per channel in one batch
        rows.append(
            _row(
                compare(
                    f"moving mean {match.name}",
                    mean.torch_value(),
                    mean.keras_variable.numpy(),
                    rtol=rtol,
                ),
                pair.dtype,
                device,
            )
        )
        keras_var = np.asarray(var.keras_variable.numpy())
        predicted = keras_var
        detail = "no train-mode batch: statistics unchanged"
        if passes:
            predicted = torch_running_var_from_keras(
                keras_var,
                initial=initial[id(layer)],
                momentum=layer.momentum,
                count=count,
                steps=passes,
            ).astype(keras_var.dtype)
            raw = compare("raw", var.torch_value(), keras_var, rtol=rtol)
            detail = (
                f"torch's unbiased running_var predicted from Keras' biased moving variance "
                f"(n={count}, {passes} batches); raw gap {raw.max_rel:.2e} rel"
            )
        rows.append(
            _row(
                compare(
                    f"moving variance {match.name} (torch convention)",
                    var.torch_value(),
                    predicted,
                    rtol=rtol,
                ),
                pair.dtype,
                device,
                detail,
            )
        )
        converted.append((var.keras_variable, predicted))
    return rows, converted


def _moving_variances(pair: ModelPair) -> dict[int, np.ndarray]:
    """Every paired BatchNormalization's moving variance (Keras' convention), by layer id."""
    return {
        id(m.keras_layer): np.asarray(v.keras_variable.numpy()).copy()
        for m, _, v in _batchnorms(pair)
    }


def _report_after_steps(
    report: ParityReport,
    pair: ModelPair,
    x: Any,
    initial: dict[int, np.ndarray],
    passes: int,
    rtol: float,
) -> None:
    """The BatchNorm statistics after ``passes`` train-mode batches, then the eval-mode logits."""
    rows, converted = _statistics_rows(pair, initial, passes, rtol, pair.device)
    report.extend(rows)
    report.extend(_eval_rows(pair, x, converted, rtol, pair.device))


def _eval_rows(
    pair: ModelPair, x: Any, converted: list[tuple[Any, np.ndarray]], rtol: float, device: str
) -> list[Row]:
    """Eval-mode logits after the steps; Keras runs with its moving variances in torch's
    convention (restored afterwards), so the comparison tests everything but that known gap."""
    saved = [(v, v.numpy().copy()) for v, _ in converted]
    try:
        for variable, value in converted:
            variable.assign(value)
        with tf.device(tf_device(device)):
            keras_logits = keras_outputs(forward_keras(pair, x, training=False)[0])
    finally:
        for variable, value in saved:
            variable.assign(value)
    torch_logits = torch_outputs_in_keras_layout(
        pair.pairing(), forward_torch(pair, x, training=False)[0]
    )
    name = "eval logits after steps"
    if converted:
        name += " (Keras BN variance in torch's convention)"
    detail = note("batchnorm_variance") if converted else ""
    return [
        _row(c, pair.dtype, device, detail)
        for c in compare_outputs(name, torch_logits, keras_logits, rtol=rtol)
    ]


def check_parity(
    keras_model: keras.Model,
    torch_module: Any,
    x: Any,
    y: Any,
    *,
    loss: LossSpec = "sparse_categorical_crossentropy",
    loss_weights: Mapping[str, float] | None = None,
    training: bool = False,
    steps: int = 0,
    keras_optimizer: keras.optimizers.Optimizer | None = None,
    torch_optimizer: Any = None,
    device: str = "cpu",
    rtol: float | None = None,
    layer_map: Mapping[str, str | None] | None = None,
    transfer: bool = True,
    dropout_masks: Sequence[Any] | None = None,
    seed: int = 0,
    torch_input: TorchInput = "auto",
) -> ParityReport:
    """Pair the layers, transfer weights Keras -> torch (unless ``transfer=False``) and compare
    the two models; returns a :class:`ParityReport` (rows plus per-layer ``layers`` records).

    ``x`` is in Keras layout (channels last); ``y`` as ``loss`` expects it (integer labels for
    ``"sparse_categorical_crossentropy"``, see ``LOSS_PAIRS``). A model with several outputs
    (a dict, or a list) -- the torch module returning the same structure -- takes ``y`` and
    ``loss`` as dicts by output name (one loss name serves every output) and optional
    ``loss_weights``: the loss is ``sum_o w_o * mean loss_o``, Keras' ``compile(loss={...},
    loss_weights={...})``; each output is compared on its own row (``logits NAME``).
    ``training`` runs both models in training mode (BatchNorm batch statistics; Dropout with
    injected keep-masks: ``dropout_masks`` in definition order, else drawn from
    ``numpy.random.default_rng(seed)`` for every pass). The torch module must live on
    ``device``'s torch device already. ``layer_map``: ``{keras_layer_name: torch_module_name or
    None}`` overrides the pairing (None: torch's forward code computes that layer); keyed by a
    Keras variable (``"layer/variable"``) it pairs a weight outside every layer kind -- a custom
    layer's ``add_weight`` -- with a torch parameter outside every paired module (a root-level
    ``nn.Parameter``), which otherwise pair by name.
    ``torch_input``: the layout the torch module takes -- ``"auto"`` (channels first when the
    model starts with a convolution, pooling or padding), ``"channels_first"`` or
    ``"channels_last"`` (``x`` as given).
    """
    _check_arguments(loss, steps, keras_optimizer, torch_optimizer, transfer)
    dtype = model_dtype(keras_model)
    report = ParityReport()
    pair = ModelPair(keras_model, torch_module, dtype, device, layer_map, torch_input)
    pairs = _pair(pair, x, steps, report)
    if pairs is None:  # refused: the report says why
        return report
    loss_terms(pair.pairing().outputs, loss, loss_weights)  # bad loss / loss_weights: refused
    bounds = _Bounds.resolve(dtype, rtol)
    pairs = _transfer(pair, pairs, x, transfer, bounds.one_pass, report)
    passes = _Passes(pair, x, y, loss, loss_weights, training, dropout_masks, seed)
    initial = _moving_variances(pair)  # before a train-mode pass moves them
    keras_eval, torch_eval = passes.evaluate()
    comparisons, records = _compare(pair, pairs, keras_eval, torch_eval, bounds.one_pass)
    _report(report, comparisons, records, dtype, device)
    if steps:
        assert keras_optimizer is not None  # refused above without both optimizers
        _take_steps(report, pair, pairs, passes, steps, keras_optimizer, torch_optimizer, bounds)
        passed = (steps + 1) if training else 0  # train-mode batches the statistics saw
        _report_after_steps(report, pair, x, initial, passed, bounds.trajectory)
    return report


def _check_arguments(
    loss: LossSpec, steps: int, keras_optimizer: Any, torch_optimizer: Any, transfer: bool
) -> None:
    if isinstance(loss, str) and loss not in LOSS_PAIRS:
        raise InvalidArgumentError(
            f"Unknown loss {loss!r}. Expected one of {sorted(LOSS_PAIRS)}. Received: loss={loss!r}"
        )
    if not isinstance(loss, (str, Mapping)):
        raise InvalidArgumentError(
            f"loss must be a loss name or a dict of them by output. Received: loss={loss!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidArgumentError(f"steps must be a non-negative int. Received: steps={steps!r}")
    if steps and (keras_optimizer is None or torch_optimizer is None):
        raise InvalidArgumentError(
            "steps > 0 needs both keras_optimizer and torch_optimizer. Received: "
            f"keras_optimizer={keras_optimizer!r}, torch_optimizer={torch_optimizer!r}"
        )
    if not isinstance(transfer, bool):
        raise InvalidArgumentError(f"transfer must be a bool. Received: transfer={transfer!r}")


@dataclass(frozen=True)
class _Bounds:
    """The two relative bounds of a run, resolved once: ``one_pass`` (the ``model_cross`` claim:
    outputs, loss, gradients, the Flatten-order probe) and ``trajectory`` (weights, statistics
    and eval logits after the steps); ``rtol`` given replaces both."""

    one_pass: float
    trajectory: float

    @classmethod
    def resolve(cls, dtype: str, rtol: float | None) -> _Bounds:
        return cls(
            resolve_rtol("model_cross", dtype, rtol), resolve_rtol("trajectory", dtype, rtol)
        )


def _pair(pair: ModelPair, x: Any, steps: int, report: ParityReport) -> list[ParameterPair] | None:
    """Pair: layers, configurations and parameters; ``None`` (a failed row added) when the two
    models cannot be compared -- a pairing refused, or, with ``steps``, torch tensors that train
    without a Keras variable (found before any weight moves)."""
    try:
        pairs = pair.parameter_pairs(x)
    except PairingError as exc:
        report.extend(
            [
                Row(
                    "layer pairing and configuration",
                    pair.dtype,
                    pair.device,
                    "fail",
                    detail=str(exc),
                )
            ]
        )
        return None
    trained = [name for p in pairs if p.trainable for name in p.trained_frozen()]
    if steps and trained:
        detail = (
            f"{', '.join(trained)} train in torch but have no Keras variable. {note('lstm_bias')}"
        )
        report.extend(
            [
                Row(
                    "torch tensors without a Keras variable",
                    pair.dtype,
                    pair.device,
                    "fail",
                    detail=detail,
                )
            ]
        )
        return None
    return pairs


def _transfer(
    pair: ModelPair,
    pairs: list[ParameterPair],
    x: Any,
    transfer: bool,
    rtol: float,
    report: ParityReport,
) -> list[ParameterPair]:
    """Transfer the weights Keras -> torch (unless ``transfer=False``), settle the order in which
    torch flattens each map a Dense reads (a settled order re-pairs that Dense's kernel, so the
    parameter pairs are made and transferred again), and report trainable-flag mismatches and
    unsettled Flatten orders as failed rows; returns the final parameter pairs."""
    report.extend(_failures(trainable_mismatches(pairs), pair.dtype, pair.device))
    if transfer:
        copy_weights(pairs, direction="keras_to_torch")
    report.extend(_failures(settle_flatten_orders(pair, x, rtol=rtol), pair.dtype, pair.device))
    pairs = pair.parameter_pairs()
    if transfer:
        copy_weights(pairs, direction="keras_to_torch")
    return pairs


@dataclass
class _Passes:
    """Evaluate: one pass of both models on the same batch (logits, loss, gradients, per-layer
    outputs), in training mode with the same Dropout keep-masks when ``training`` (given, else
    drawn from ``numpy.random.default_rng(seed)`` afresh for every pass)."""

    pair: ModelPair
    x: Any
    y: Any
    loss: LossSpec
    loss_weights: Mapping[str, float] | None
    training: bool
    dropout_masks: Sequence[Any] | None
    seed: int
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def evaluate(self) -> tuple[Evaluation, Evaluation]:
        masks = self.dropout_masks
        if masks is None and self.training:
            masks = dropout_masks_for(self.pair.keras, self.x, self.rng)
        kwargs: dict[str, Any] = {
            "training": self.training,
            "dropout_masks": masks,
            "loss": self.loss,
            "loss_weights": self.loss_weights,
        }
        return (
            evaluate_keras(self.pair, self.x, self.y, **kwargs),
            evaluate_torch(self.pair, self.x, self.y, **kwargs),
        )


def _compare(
    pair: ModelPair,
    pairs: list[ParameterPair],
    keras_eval: Evaluation,
    torch_eval: Evaluation,
    rtol: float,
) -> tuple[list[Comparison], list[LayerRecord]]:
    """Compare one pass: logits, loss and gradients, and the per-layer records -- every paired
    layer's output in model order, then every gradient."""
    comparisons = compare_evaluations(keras_eval, torch_eval, dtype=pair.dtype, rtol=rtol)
    kinds = {p.keras_variable.path: p.layer for p in pairs}
    records = compare_layers(pair.pairing(), keras_eval, torch_eval, rtol=rtol)
    return comparisons, records + gradient_records(comparisons, kinds)


def _report(
    report: ParityReport,
    comparisons: list[Comparison],
    records: list[LayerRecord],
    dtype: str,
    device: str,
) -> None:
    """Report one pass: its records, a row per comparison, then a row per layer output."""
    report.layers = records
    report.extend([_row(c, dtype, device) for c in comparisons])
    outputs = [r for r in records if r.stage == "output"]
    report.extend([_row(r, dtype, device, check=f"output {r.name}") for r in outputs])


def _take_steps(
    report: ParityReport,
    pair: ModelPair,
    pairs: list[ParameterPair],
    passes: _Passes,
    steps: int,
    keras_optimizer: keras.optimizers.Optimizer,
    torch_optimizer: Any,
    bounds: _Bounds,
) -> None:
    """``steps`` updates of both models from the same gradients, a row per trainable weight
    after each; a weight within ``zero_atol`` of 0 (64 ulps of the largest initial weight) is
    compared absolutely."""
    trainable = [p for p in pairs if p.trainable]
    atol = zero_atol(pair.dtype, (p.keras_variable.numpy() for p in trainable))
    for step in range(1, steps + 1):
        keras_eval, _ = passes.evaluate()  # leaves .grad on the torch parameters
        with tf.device(tf_device(pair.device)):
            keras_optimizer.apply_gradients(
                [
                    (tf.constant(keras_eval.gradients[p.keras_variable.path]), p.keras_variable)
                    for p in trainable
                ]
            )
        torch_optimizer.step()
        report.extend(
            [
                _row(
                    compare_floored(
                        f"step {step} {p.keras_variable.path}",
                        p.torch_value(),
                        np.asarray(p.keras_variable.numpy()),
                        rtol=bounds.trajectory,
                        atol=atol,
                    ),
                    pair.dtype,
                    pair.device,
                )
                for p in trainable
            ]
        )


def assert_parity(
    keras_model: keras.Model, torch_module: Any, x: Any, y: Any, **kwargs: Any
) -> ParityReport:
    """:func:`check_parity`, raising ``AssertionError`` when any row failed: the message names
    the first diverging layer and gradient, the failing rows, then the whole table. For pytest:
    call it in a test."""
    report = check_parity(keras_model, torch_module, x, y, **kwargs)
    if report.failed:
        names = ", ".join(
            f"{r.check} ({r.status}{': ' + r.detail if r.detail else ''})" for r in report.failed
        )
        where = report.summary()
        if any(r.check.startswith("step ") for r in report.failed):
            # the usual causes of a diverging trajectory, from the table of differences
            causes = ("optimizer_hyperparameters", "adam_epsilon", "weight_decay")
            where += " " + " ".join(note(topic) for topic in causes)
        raise AssertionError(
            f"parity failed for {names}{'; ' + where if where else ''}\n{report.to_text()}"
        )
    return report


__all__ = ["assert_parity", "check_parity"]
