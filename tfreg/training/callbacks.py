"""``Trainer.fit``'s Keras callbacks: ``keras.callbacks.Callback`` objects driven through
``run_fit``'s hooks with Keras' signatures (:class:`KerasCallbacks`) and the model they see
(:class:`CallbackModel`)."""

from __future__ import annotations

from typing import Any

from tfreg._compat import keras
from tfreg_core.training import RECORD_FIELDS, ArrayData, History, StreamData

__all__ = ["CallbackModel", "KerasCallbacks"]


class CallbackModel:
    """``self.model`` of the Keras callbacks in ``Trainer.fit``: the trained model (every
    attribute read from it: weights, ``save_weights``, layers...) with the trainer's optimizer
    as ``optimizer`` -- what ``LearningRateScheduler``, ``ReduceLROnPlateau`` and
    ``TensorBoard`` read and set, as on a compiled model in ``fit``; the learning rate they
    assign is the optimizer's variable, read by the next update -- and its own
    ``stop_training`` (the user's model is not written to)."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self._model = model
        self.optimizer = optimizer
        self.stop_training = False

    def __getattr__(self, name: str) -> Any:
        if name == "_model":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._model, name)


class KerasCallbacks:
    """``keras.callbacks.Callback`` objects driven by ``run_fit``'s hooks with Keras'
    signatures: ``on_train_batch_end(update, logs)`` per update (``logs``: the record's
    values), ``on_epoch_end(epoch, logs)`` after validation; ``model.stop_training`` (what
    ``EarlyStopping`` sets) stops the trainer."""

    def __init__(
        self,
        callbacks: list[Any],
        model: CallbackModel,
        epochs: int,
        data: ArrayData | StreamData,
        verbose: int,
    ) -> None:
        self.model = model
        self.list = keras.callbacks.CallbackList(
            callbacks,
            add_history=False,
            add_progbar=False,
            model=model,
            epochs=epochs,
            steps=None,
            verbose=verbose,
        )
        self.data = data

    def _sync(self, trainer: Any) -> None:
        if getattr(self.model, "stop_training", False):
            trainer.stop_training = True

    def on_train_begin(self, trainer: Any) -> None:
        self.list.set_params(
            {
                "epochs": self.list.params["epochs"],
                "verbose": self.list.params["verbose"],
                "steps": self.data.updates(trainer.spec),
            }
        )
        self.model.stop_training = False
        self.list.on_train_begin()
        self._sync(trainer)

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        self.list.on_epoch_begin(epoch)
        self._sync(trainer)

    def on_update_end(self, trainer: Any, record: dict[str, Any]) -> None:
        logs = {k: v for k, v in record.items() if k not in RECORD_FIELDS}
        self.list.on_train_batch_end(record["update"], logs)
        self._sync(trainer)

    def on_epoch_end(self, trainer: Any, epoch: int, history: History) -> None:
        self.list.on_epoch_end(epoch, dict(history.epochs[-1]))
        self._sync(trainer)

    def on_train_end(self, trainer: Any, history: History) -> None:
        self.list.on_train_end(dict(history.epochs[-1]) if history.epochs else None)
