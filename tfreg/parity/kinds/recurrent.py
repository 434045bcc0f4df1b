"""Recurrent kinds: LSTM and GRU (gate order and LSTM's second bias from the table of
differences)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import nn

from tfreg._compat import keras
from tfreg.parity.kinds._common import L, first_mismatch
from tfreg.parity.registry import Context, Weight, register_layer_pair
from tfreg_harness.differences import note
from tfreg_harness.layouts import (
    gate_permutation,
    recurrent_kernel_to_keras,
    recurrent_kernel_to_torch,
)


def _recurrent_problem(k: Any, t: Any, ctx: Context, *, gru: bool) -> str | None:
    cell = k.cell
    acts = keras.activations
    fields = [
        ("units / hidden_size", int(k.units), int(t.hidden_size)),
        ("input size", int(ctx.input_shape[-1]), int(t.input_size)),
        ("num_layers", 1, t.num_layers),
        ("bidirectional", False, t.bidirectional),
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
        ("go_backwards", False, k.go_backwards),
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
    if problem:
        return f"{problem}. {note('gru_gates' if gru else 'lstm_bias')}"
    return None


def _recurrent_weights(k: Any, t: Any, ctx: Context, *, gru: bool) -> list[Weight]:
    perm = gate_permutation(int(k.units), *(("zrh", "rzh") if gru else ("ifco", "ifco")))
    inverse = np.argsort(perm)
    out = [
        Weight(
            "cell.kernel",
            "weight_ih_l0",
            lambda a: recurrent_kernel_to_torch(a, perm),
            lambda a: recurrent_kernel_to_keras(a, perm),
        ),
        Weight(
            "cell.recurrent_kernel",
            "weight_hh_l0",
            lambda a: recurrent_kernel_to_torch(a, perm),
            lambda a: recurrent_kernel_to_keras(a, perm),
        ),
    ]
    if not k.cell.use_bias:
        return out
    if gru:  # reset_after=True: Keras bias (2, 3u) = [input bias, recurrent bias]
        bias = Weight(
            "cell.bias",
            ("bias_ih_l0", "bias_hh_l0"),
            lambda b: (b[0][perm], b[1][perm]),
            lambda ts: np.stack([ts[0][inverse], ts[1][inverse]]),
        )
    else:  # one Keras bias = torch bias_ih + bias_hh; the transfer zeros bias_hh
        bias = Weight(
            "cell.bias",
            ("bias_ih_l0", "bias_hh_l0"),
            lambda b: (b[perm], np.zeros_like(b)),
            lambda ts: (ts[0] + ts[1])[inverse],
            grad_to_keras=lambda gs: gs[0][inverse],
        )
    return [*out, bias]


def _recurrent_output(y: Any, k: Any, ctx: Context) -> np.ndarray:
    sequence = y[0] if isinstance(y, tuple) else y  # torch returns (output, state)
    return sequence if k.return_sequences else sequence[:, -1]


for _keras_rnn, _torch_rnn, _gru in ((L.LSTM, nn.LSTM, False), (L.GRU, nn.GRU, True)):
    register_layer_pair(
        _keras_rnn,
        _torch_rnn,
        transfer=functools.partial(_recurrent_weights, gru=_gru),
        check=functools.partial(_recurrent_problem, gru=_gru),
        torch_layout="channels_last",
        output=_recurrent_output,
    )
