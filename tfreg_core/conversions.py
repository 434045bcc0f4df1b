"""Coupled weight decay <-> L2 penalty conversions.

``torch.optim.SGD/Adam(weight_decay=wd)`` adds ``wd * w`` to the gradient before the update
("coupled" decay). That is exactly the gradient of the penalty ``wd / 2 * sum(w**2)``, i.e. Keras'
``L2(l2=wd / 2)`` (Keras' L2 has no 1/2). Decoupled decay -- ``torch.optim.AdamW``, and every Keras
optimizer's ``weight_decay`` argument -- shrinks weights outside the gradient, after the adaptive
scaling, and is *not* equivalent to any L2 penalty for adaptive optimizers; for plain SGD it equals
coupled decay with ``wd_decoupled = lr * wd_coupled`` only when the learning rate is constant.
"""

from __future__ import annotations

from tfreg_core.validation import non_negative_float


def torch_weight_decay_to_l2(weight_decay: float) -> float:
    """The Keras ``L2`` factor equivalent to torch's coupled ``weight_decay``: ``wd / 2``."""
    return non_negative_float(weight_decay, "weight_decay") / 2.0


def l2_to_torch_weight_decay(l2: float) -> float:
    """The torch coupled ``weight_decay`` equivalent to a Keras ``L2(l2)`` penalty: ``2 * l2``."""
    return 2.0 * non_negative_float(l2, "l2")
