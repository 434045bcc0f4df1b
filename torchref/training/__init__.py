"""Training with exact gradient accumulation for PyTorch: ``Trainer``, the twin of
``tfreg.Trainer`` (same signature, same window plan, same update rule -- see
:mod:`tfreg_core.training`). ``KerasAdamW``, a torch optimizer with Keras' Adam/AdamW
arithmetic, lives in :mod:`torchref.optimizers`.

Differences from TensorFlow (``tfreg.training``): ``optimizer`` is a ``torch.optim`` optimizer
built on the model's parameters, and ``loss`` is a torch loss -- a name from ``LOSSES``, a
``torch.nn`` loss module as users build it, a ``torch.nn.functional`` loss (``F.cross_entropy``,
``F.mse_loss``... or a ``functools.partial`` of one with ``weight``, ``ignore_index``,
``label_smoothing``, ``reduction``...: read as its module twin built with those keyword
arguments), or a callable declared with :func:`per_element` (per-element values and which of
them count). Any other callable is refused when the trainer is built: its denominator is
invisible (``F.cross_entropy`` behind a lambda returns a batch mean; averaging those per
micro-batch is not the window's mean). ``jit_compile`` must be False (torchref runs eagerly).
Checkpoints are ``state_dict()`` / ``load_state_dict()``. Losses and their counts:
:mod:`torchref.training.losses`.

The package, one concept per module (the names of ``tfreg.training``'s): :mod:`.window` (the
open window and closing it into one update, on :mod:`tfreg_core.update`), :mod:`.losses`,
:mod:`.amp` (``autocast`` and :class:`LossScale`), :mod:`.engine` (one micro-batch, one
update, validation) and :mod:`.trainer` (``Trainer``).
"""

from tfreg_core.training import History
from torchref.training.amp import LossScale
from torchref.training.losses import LOSSES, PerElementLoss, per_element, per_example_loss
from torchref.training.trainer import Trainer

# The public home of the classes (reprs, docs, and the checkpoint manager's trainer check,
# which reads the class's module: torchref.checkpoint cannot import the Trainer).
for _public in (LossScale, PerElementLoss, Trainer):
    _public.__module__ = __name__

__all__ = [
    "LOSSES",
    "History",
    "LossScale",
    "PerElementLoss",
    "Trainer",
    "per_element",
    "per_example_loss",
]
