"""Which variables a penalty applies to, summed once: ``penalty(model, regularizer)``.

Scope rule (mirrored exactly by ``torchref.penalty``): a model's or layer's *kernels* are its
trainable variables of rank >= 2 -- Dense/Conv kernels, embeddings. Biases and normalization
scales/offsets (rank 1) are exempt unless ``include_bias=True``, which takes every trainable
variable. Non-trainable state (BatchNorm moving statistics) is never penalised. An explicit
sequence of variables is taken as given: you chose them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from tfreg._compat import keras, tf
from tfreg.regularizers import get
from tfreg_core import validation

__all__ = ["penalized_parameters", "penalized_variables", "penalty"]


def penalized_variables(
    model_or_variables: keras.layers.Layer | Iterable[Any], *, include_bias: bool = False
) -> list[Any]:
    """The variables :func:`penalty` sums over, in the model's variable order."""
    include_bias = validation.strict_bool(include_bias, "include_bias")
    if isinstance(model_or_variables, (keras.layers.Layer, tf.Module)):
        trainable = list(model_or_variables.trainable_variables)
        if include_bias:
            return trainable
        return [v for v in trainable if len(v.shape) >= 2]
    # A single tensor is iterable (over its rows): penalising those would silently change what
    # PNorm, GroupLasso and OrthogonalRegularizer compute. torchref rejects a lone tensor too.
    single = (str, bytes, tf.Tensor, tf.Variable, keras.Variable, np.ndarray)
    if isinstance(model_or_variables, single) or not isinstance(model_or_variables, Iterable):
        raise TypeError(
            "penalty() expects a keras Layer/Model, a tf.Module or a sequence of variables. "
            f"Received: model_or_variables={model_or_variables!r}"
        )
    return list(model_or_variables)


penalized_parameters = penalized_variables
"""torchref's name for :func:`penalized_variables`, so code written against either twin runs on
both."""


def penalty(
    model_or_variables: keras.layers.Layer | Sequence[Any],
    regularizer: Callable[[Any], Any] | str | dict[str, Any],
    *,
    include_bias: bool = False,
) -> tf.Tensor:
    """Total ``sum_v regularizer(v)`` over the penalised variables (see module docstring).

    ``regularizer`` is a tfreg/Keras regularizer, any callable of one tensor, or a key accepted by
    :func:`tfreg.get` (``None`` is rejected: it would mean "no penalty", which is a caller bug
    here). Returns a scalar in the variables' dtype. When nothing is penalised it is 0.0 in the
    model's variable dtype (its first trainable variable's, else the layer's ``variable_dtype``),
    or ``keras.config.floatx()`` for an empty sequence -- so adding it to a float64 loss works.
    """
    variables = penalized_variables(model_or_variables, include_bias=include_bias)
    reg = get(regularizer)  # None only for None
    if reg is None:
        raise validation.InvalidArgumentError(
            "penalty() needs a regularizer (a callable, a config or a key such as 'l2'). "
            f"Received: regularizer={regularizer!r}"
        )
    if not variables:
        return tf.zeros((), dtype=_variable_dtype(model_or_variables))
    return tf.add_n([tf.convert_to_tensor(reg(v)) for v in variables])


def _variable_dtype(model_or_variables: Any) -> str:
    trainable = getattr(model_or_variables, "trainable_variables", None)
    if trainable:
        return tf.as_dtype(trainable[0].dtype).name
    return getattr(model_or_variables, "variable_dtype", None) or keras.config.floatx()
