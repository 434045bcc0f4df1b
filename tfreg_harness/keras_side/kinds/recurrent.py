"""Recurrent kinds: LSTM and GRU (gate order and LSTM's second bias from the table of
differences)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import nn

from tfreg._compat import keras
from tfreg_harness.differences import note
from tfreg_harness.keras_side.kinds._common import L, first_mismatch
from tfreg_harness.keras_side.registry import Context, Weight, register_layer_pair
from tfreg_harness.layouts import (
    gate_permutation,
    recurrent_kernel_to_keras,
    recurrent_kernel_to_torch,
)


def _direction_problem(k: Any, t: Any, *, gru: bool) -> str | None:
    """One Keras LSTM/GRU (a direction of a Bidirectional) against torch's configuration."""
    cell = k.cell
    acts = keras.activations
    fields = [
        ("units / hidden_size", int(k.units), int(t.hidden_size)),
        ("batch_first", True, t.batch_first),
        ("use_bias", cell.use_bias, t.bias),
        ("activation", "tanh", "tanh" if cell.activation is acts.tanh else repr(cell.activation)),
        (
            "recurrent_activation",
            "sigmoid",
            "sigmoid"
            if cell.recurrent_activation is acts.sigmoid
            else repr(cell.recurrent_activation),
        ),
        ("return_state", False, k.return_state),
        ("stateful", False, k.stateful),
        (
            "dropout, recurrent_dropout",
            (0.0, 0.0),
            (float(cell.dropout), float(cell.recurrent_dropout)),
        ),
    ]
    if gru:
        fields.append(
            ("reset_after (torch applies the reset gate after the matmul)", True, cell.reset_after)
        )
    else:
        fields.append(("proj_size", 0, t.proj_size))
    problem = first_mismatch(fields)
    return f"{problem}. {note('gru_gates' if gru else 'lstm_bias')}" if problem else None


def _stack_problem(k: Any, t: Any, ctx: Context, *, bidirectional: bool) -> str | None:
    """What a Keras layer at ``ctx.torch_layer`` of a (stacked) torch RNN must agree on."""
    index, count = ctx.torch_layer
    width = int(t.hidden_size) * (2 if t.bidirectional else 1)
    return first_mismatch(
        [
            ("bidirectional (Keras Bidirectional)", bidirectional, t.bidirectional),
            ("num_layers (consecutive Keras layers)", count, t.num_layers),
            (
                f"input size of layer {index}",
                int(ctx.input_shape[-1]),
                int(t.input_size) if index == 0 else width,
            ),
            (
                "return_sequences below the top layer (torch feeds each layer the sequence)",
                True,
                True if index == count - 1 else bool(k.return_sequences),
            ),
            ("dropout between stacked layers", 0.0, float(t.dropout)),
        ]
    )


def _recurrent_problem(k: Any, t: Any, ctx: Context, *, gru: bool) -> str | None:
    return (
        _stack_problem(k, t, ctx, bidirectional=False)
        or first_mismatch([("go_backwards", False, k.go_backwards)])
        or _direction_problem(k, t, gru=gru)
    )


# Keras and torch gate orders per family (None: SimpleRNN, one block)
GATES = {True: ("zrh", "rzh"), False: ("ifco", "ifco"), None: ("h", "h")}


def _direction_weights(
    prefix: str, suffix: str, units: int, cell: Any, *, gru: bool | None
) -> list[Weight]:
    """The Keras variables ``prefix + "cell.kernel"`` ... of one direction of one layer and
    torch's ``weight_ih`` ... ``+ suffix`` (``_l1``, ``_l0_reverse``)."""
    perm = gate_permutation(units, *GATES[gru])
    inverse = np.argsort(perm)
    out = [
        Weight(
            f"{prefix}cell.{keras_name}",
            f"{torch_name}{suffix}",
            lambda a: recurrent_kernel_to_torch(a, perm),
            lambda a: recurrent_kernel_to_keras(a, perm),
        )
        for keras_name, torch_name in (("kernel", "weight_ih"), ("recurrent_kernel", "weight_hh"))
    ]
    if not cell.use_bias:
        return out
    biases = (f"bias_ih{suffix}", f"bias_hh{suffix}")
    if gru is True:  # reset_after=True: Keras bias (2, 3u) = [input bias, recurrent bias]
        bias = Weight(
            f"{prefix}cell.bias",
            biases,
            lambda b: (b[0][perm], b[1][perm]),
            lambda ts: np.stack([ts[0][inverse], ts[1][inverse]]),
        )
    else:  # one Keras bias (LSTM, SimpleRNN) = torch bias_ih + bias_hh; bias_hh is zeroed
        bias = Weight(
            f"{prefix}cell.bias",
            biases,
            lambda b: (b[perm], np.zeros_like(b)),
            lambda ts: (ts[0] + ts[1])[inverse],
            grad_to_keras=lambda gs: gs[0][inverse],
            torch_frozen=(biases[1],),
        )
    return [*out, bias]


def _recurrent_weights(k: Any, t: Any, ctx: Context, *, gru: bool) -> list[Weight]:
    suffix = f"_l{ctx.torch_layer[0]}"
    return _direction_weights("", suffix, int(k.units), k.cell, gru=gru)


def _recurrent_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    sequence = y[0] if isinstance(y, tuple) else y  # torch returns (output, state)
    return sequence if k.return_sequences else sequence[:, -1]


def _layers(t: Any) -> int:
    return int(t.num_layers)


for _keras_rnn, _torch_rnn, _gru in ((L.LSTM, nn.LSTM, False), (L.GRU, nn.GRU, True)):
    register_layer_pair(
        _keras_rnn,
        _torch_rnn,
        transfer=functools.partial(_recurrent_weights, gru=_gru),
        check=functools.partial(_recurrent_problem, gru=_gru),
        torch_layout="channels_last",
        output=_recurrent_output,
        torch_layers=_layers,
    )


# --- Bidirectional ------------------------------------------------------------------------------


def _is_gru(k: Any) -> bool:
    return isinstance(k.forward_layer, L.GRU)


def _bidirectional_problem(k: Any, t: Any, ctx: Context) -> str | None:
    forward, backward = k.forward_layer, k.backward_layer
    expected = nn.GRU if _is_gru(k) else nn.LSTM
    if type(forward) is not type(backward) or not isinstance(forward, (L.LSTM, L.GRU)):
        return "only Bidirectional(LSTM) / Bidirectional(GRU) with the same layer both ways map"
    if type(t) is not expected:
        return f"Bidirectional({type(forward).__name__}) pairs with torch {expected.__name__}"
    return (
        first_mismatch(
            [
                ("merge_mode (torch concatenates [forward, backward])", "concat", k.merge_mode),
                (
                    "forward go_backwards, backward go_backwards",
                    (False, True),
                    (bool(forward.go_backwards), bool(backward.go_backwards)),
                ),
                ("backward units", int(forward.units), int(backward.units)),
            ]
        )
        or _stack_problem(forward, t, ctx, bidirectional=True)
        or _direction_problem(forward, t, gru=_is_gru(k))
        or _direction_problem(backward, t, gru=_is_gru(k))
    )


def _bidirectional_weights(k: Any, t: Any, ctx: Context) -> list[Weight]:
    suffix, gru = f"_l{ctx.torch_layer[0]}", _is_gru(k)
    return [
        *_direction_weights(
            "forward_layer.", suffix, int(k.forward_layer.units), k.forward_layer.cell, gru=gru
        ),
        *_direction_weights(
            "backward_layer.",
            f"{suffix}_reverse",
            int(k.backward_layer.units),
            k.backward_layer.cell,
            gru=gru,
        ),
    ]


def _bidirectional_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    sequence = y[0] if isinstance(y, tuple) else y
    if k.return_sequences:
        return sequence
    # Keras: the forward direction's last step and the backward direction's last step, which
    # is the first position of torch's (time-ordered) backward half
    half = sequence.shape[-1] // 2
    return np.concatenate([sequence[:, -1, :half], sequence[:, 0, half:]], axis=-1)


register_layer_pair(
    L.Bidirectional,
    (nn.LSTM, nn.GRU),
    transfer=_bidirectional_weights,
    check=_bidirectional_problem,
    torch_layout="channels_last",
    output=_bidirectional_output,
    torch_layers=_layers,
)


# --- TimeDistributed ----------------------------------------------------------------------------


def _time_distributed_problem(k: Any, t: Any, ctx: Context) -> str | None:
    if not isinstance(k.layer, L.Dense):
        return f"only TimeDistributed(Dense) maps (to nn.Linear); found {type(k.layer).__name__}"
    return first_mismatch([("use_bias", k.layer.use_bias, t.bias is not None)])


register_layer_pair(
    L.TimeDistributed,
    nn.Linear,
    # nn.Linear maps the last axis of (batch, time, features) per step, as TimeDistributed(Dense)
    transfer=lambda k, t, ctx: [
        Weight(
            "layer.kernel",
            "weight",
            lambda a: np.ascontiguousarray(a.T),
            lambda a: np.ascontiguousarray(a.T),
        ),
        *([Weight("layer.bias", "bias")] if k.layer.use_bias else []),
    ],
    check=_time_distributed_problem,
    torch_layout="channels_last",
)


# --- SimpleRNN ----------------------------------------------------------------------------------


def _simple_rnn_problem(k: Any, t: Any, ctx: Context) -> str | None:
    activation = "tanh" if k.cell.activation is keras.activations.tanh else "relu"
    if k.cell.activation not in (keras.activations.tanh, keras.activations.relu):
        activation = repr(k.cell.activation)
    return _stack_problem(k, t, ctx, bidirectional=False) or first_mismatch(
        [
            ("units / hidden_size", int(k.units), int(t.hidden_size)),
            ("activation / nonlinearity", activation, t.nonlinearity),
            ("batch_first", True, t.batch_first),
            ("use_bias", k.cell.use_bias, t.bias),
            ("go_backwards", False, k.go_backwards),
            ("return_state", False, k.return_state),
            ("stateful", False, k.stateful),
            (
                "dropout, recurrent_dropout",
                (0.0, 0.0),
                (float(k.cell.dropout), float(k.cell.recurrent_dropout)),
            ),
        ]
    )


register_layer_pair(
    L.SimpleRNN,
    nn.RNN,
    transfer=lambda k, t, ctx: _direction_weights(
        "", f"_l{ctx.torch_layer[0]}", int(k.units), k.cell, gru=None
    ),
    check=_simple_rnn_problem,
    torch_layout="channels_last",
    output=_recurrent_output,
    torch_layers=_layers,
)
