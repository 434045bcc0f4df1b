"""``Trainer``: a ``tf.GradientTape`` training loop with exact gradient accumulation (see
:mod:`tfreg.training`); its steps are :class:`tfreg.training.engine.Engine`'s, its loop
:func:`tfreg_core.training.run_fit`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tfreg import accumulation
from tfreg._compat import keras, tf
from tfreg._losses import loss_terms, output_names
from tfreg.batchnorm import WindowMoments
from tfreg.checkpoint import run_fingerprint
from tfreg.distributed import replicas
from tfreg.proximal import PROXIMAL_CLASSES, Proximal
from tfreg.regularizers import get as _get_regularizer
from tfreg.training import checks
from tfreg.training.callbacks import CallbackModel, KerasCallbacks
from tfreg.training.checkpoint import (
    ONE_DEVICE,
    ReplicaLocal,
    TrainerCheckpoint,
    WindowHeader,
    layout_text,
)
from tfreg.training.engine import Engine, scope
from tfreg_core.batchnorm import check_mode as _check_batchnorm_mode
from tfreg_core.training import (
    ArrayData,
    History,
    StreamData,
    TrainerSpec,
    fit_data,
    object_config,
    resolve_proximal,
    run_fit,
    unpack_micro_batch,
    validation_batches,
)
from tfreg_core.validation import InvalidArgumentError

__all__ = ["Trainer"]


class Trainer:
    """A ``tf.GradientTape`` training loop with exact gradient accumulation.

    Formula per update (window ``W`` of ``accumulation_steps`` micro-batches of ``batch_size``)::

        g = sum_{i in W} grad(w_i * l_i) / N_W + grad(penalty(model, regularizer)
                                                    + layer kernel_regularizer terms)
        g = clip(g);  optimizer.apply(g)             # once per window

    equal to one step of ``model.fit`` with batch size ``|W|`` on the concatenated window (up to
    float round-off). ``torchref.Trainer`` has the same signature and arithmetic; it takes a
    ``torch.optim`` optimizer and a torch loss.

    ``loss``: Keras loss object/name or ``fn(y_true, y_pred) -> per-example losses``, computed in
    the model's variable dtype; for several outputs a list/dict of them, or one applied to every
    output, with ``loss_weights`` (Keras' ``compile`` rules; ``torchref.Trainer`` has one loss).
    Targets a built-in loss would broadcast against its output, one target array for several
    outputs, and float labels for a class-index loss are refused while tracing, before any
    update. Per-example sample weights weight all of an example's loss elements (Keras raises
    for ``(N,)`` weights on an ``(N, T)`` loss). ``metrics``: names from
    ``tfreg_core.training.METRICS`` (single-output models), reported per update as
    ``sum(w*m)/sum(w)`` over the window. History records add ``elements`` (loss elements that
    counted) and, with several outputs, ``<output>_loss``. ``clipnorm`` clips each variable's
    gradient, ``global_clipnorm`` all of them, with Keras' ops: the same as the optimizer's own
    ``clipnorm`` up to the window sum's reassociation in float64 (``<= 1e-12``, pinned); in
    float32 one ulp apart at ``clipnorm=0.05`` (9.6e-8 rel), within the float32 tolerance.
    ``proximal=tfreg.ProximalL1(l1=...)`` soft-thresholds once per applied update, right after
    the step (exact zeros; do not also put an L1 penalty on the same weights). ``seed`` fixes
    the shuffling order (per epoch), which is what makes checkpoint/resume bit-identical.
    ``jit_compile=True`` compiles both steps with XLA (one compilation per distinct micro-batch
    size).

    Checkpoint/resume: ``ckpt = trainer.checkpoint()`` tracks model, optimizer, accumulator,
    position (epoch, micro-batch) and the model's ``SeedGenerator`` states (Dropout masks); a
    fresh ``Trainer`` on the same model architecture and ``metrics`` restores it with
    ``trainer.checkpoint().restore(path)`` and ``fit`` continues where it stopped, mid-window
    included, bit for bit. ``epochs`` is therefore the final epoch index to train *up to*
    (Keras' ``epochs`` with ``initial_epoch`` taken from the trainer's position): a second
    ``fit(epochs=3)`` after a first one trains nothing and warns (``UserWarning``, at every
    verbosity: Keras' own ``fit`` would stay silent); ``fit(epochs=6)`` trains three more.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: Any,
        optimizer: keras.optimizers.Optimizer | str,
        *,
        accumulation_steps: int = 1,
        regularizer: Any = None,
        include_bias: bool = False,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
        drop_remainder: bool = False,
        jit_compile: bool = False,
        metrics: Sequence[str] = (),
        seed: int = 0,
        proximal: Proximal | dict[str, Any] | Sequence[Any] | None = None,
        loss_weights: float | Sequence[float] | dict[str, float] | None = None,
        batchnorm: str = "per_micro_batch",
    ) -> None:
        self.spec = TrainerSpec(
            accumulation_steps=accumulation_steps,
            include_bias=include_bias,
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            on_nonfinite=on_nonfinite,
            drop_remainder=drop_remainder,
            jit_compile=jit_compile,
            metrics=metrics,
            seed=seed,
        )
        if not isinstance(model, keras.layers.Layer):
            raise InvalidArgumentError(f"model must be a Keras model. Received: model={model!r}")
        optimizer = keras.optimizers.get(optimizer)
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise InvalidArgumentError(
                "The optimizer accumulates gradients itself (and averages micro-batch means); "
                "use Trainer(accumulation_steps=...) instead. Received: optimizer."
                f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}"
            )
        checks.reject_activity_regularizers(model)
        checks.reject_custom_steps(model, "Trainer")
        self.batchnorm = _check_batchnorm_mode(batchnorm)
        if self.batchnorm == "per_micro_batch":
            checks.warn_batchnorm(model, accumulation_steps)
        optimizer = checks.loss_scaled(optimizer, model)
        if on_nonfinite == "raise" and isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise InvalidArgumentError(
                "float16 loss scaling skips the windows that overflow (and shrinks the scale); "
                "on_nonfinite='raise' would stop training at the first one. Use 'skip'. "
                "Received: on_nonfinite='raise' with a LossScaleOptimizer (float16 model)"
            )
        self._replicas = replicas(model, owner="Trainer")
        if self._replicas is not None:
            self._replicas.check_options(optimizer, jit_compile=jit_compile)
            checks.refuse_per_window_replicas(self.batchnorm)
        names = output_names(model)
        terms = loss_terms(loss, loss_weights, names)
        if self.spec.metrics and len(names) > 1:
            raise InvalidArgumentError(
                "metrics are computed for single-output models only. Received: "
                f"metrics={self.spec.metrics} for outputs {names}"
            )
        self.model = model
        self.loss = loss
        self.loss_weights = loss_weights
        self.optimizer = optimizer
        self.regularizer = None if regularizer is None else _get_regularizer(regularizer)
        self.proximal = resolve_proximal(proximal, PROXIMAL_CLASSES, optimizer)
        self._names, self._terms = names, terms
        self._engine: Engine | None = None
        self.stop_training = False
        # The digest of the arrays the last fit trained on ("": none, or a stream), recorded in
        # checkpoints: a mid-epoch resume on other data is refused (tfreg_core.training.run_fit).
        self.data_digest = ""
        # The digest a restored checkpoint recorded, checked by the next fit (run_fit) only.
        self.resumed_data_digest = ""

    def build(self, input_shape: Any = None) -> None:
        """Create accumulator, optimizer variables and position (``fit`` calls this).
        ``input_shape`` builds an unbuilt model (a shape, or a structure of shapes)."""
        if self._engine is not None:
            return
        if not self.model.built and input_shape is None:
            raise ValueError("The model is not built; pass input_shape or call fit first.")
        with scope(self._replicas):
            if not self.model.built:
                self.model.build(input_shape)
            if self.proximal is not None:  # before tracing: TF would wrap it (StagingError)
                self.proximal.check_model(self.model)
            self._engine = Engine(
                self.model,
                self._terms,
                self._names,
                self.optimizer,
                spec=self.spec,
                regularizer=self.regularizer,
                proximal=self.proximal,
                replicas=self._replicas,
                moments=WindowMoments(self.model) if self.batchnorm == "per_window" else None,
            )
            # Evaluated once eagerly: a regularizer's own error (an axis out of range) reaches
            # the user as is, not wrapped in TF's StagingError by the step's trace.
            self._engine.window.penalty()

    @property
    def accumulators(self) -> list[accumulation.AccumulatorState]:
        """One accumulator per loss term (output with a loss), each with its own count.

        Under a strategy the sums and counts are replica-local: reading one in cross-replica
        context gives the sum over the replicas, a collective under
        ``MultiWorkerMirroredStrategy`` (every worker must read it, or the others hang)."""
        self.build()
        assert self._engine is not None  # build() made it
        return list(self._engine.window.accs)

    @property
    def accumulator(self) -> accumulation.AccumulatorState:
        """The accumulator of a single-loss model (see ``accumulators`` for several outputs)."""
        accs = self.accumulators
        if len(accs) != 1:
            raise ValueError(f"The model has {len(accs)} loss terms; use trainer.accumulators.")
        return accs[0]

    def checkpoint(self) -> tf.train.Checkpoint:
        """Everything a resumed ``fit`` needs, mid-window included: model, optimizer,
        accumulator, position and the model's ``SeedGenerator`` states (Dropout masks).
        ``read``/``restore`` refuse a checkpoint saved with other ``metrics`` before
        restoring anything.

        Under a strategy the open window's partial sums are saved per replica, so a resume
        mid-window is bitwise too; it needs the same strategy, replica count and replicas per
        worker (refused otherwise). Under ``MultiWorkerMirroredStrategy`` each worker writes and
        restores its own checkpoint (its replicas' partial sums; another worker's is refused;
        model and optimizer are identical on every worker), at the same point of training."""
        self.build()
        engine = self._engine
        assert engine is not None  # build() made it
        window = engine.window
        state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if window.moments is not None:
            state["batchnorm"] = window.moments
        if self._replicas is None:
            state.update(accumulator=window.accs, window=window.state)
        else:
            modules: list[tf.Module] = [*window.accs, window.state]
            local = [
                v
                for module in modules
                for v in module.variables
                if v.synchronization == tf.VariableSynchronization.ON_READ
            ]
            state.update(
                replicas=ReplicaLocal(self._replicas, local),
                window=WindowHeader(window.state),
            )
        layout = ONE_DEVICE if self._replicas is None else self._replicas.layout()
        run = run_fingerprint(self, layout_text(layout))
        counters = (len(window.accs) if self._replicas is None else 0, self.spec.accumulation_steps)
        return TrainerCheckpoint(
            self.spec.metrics, layout, run, counters, self._set_data_digest, rng=engine.rng, **state
        )

    def _set_data_digest(self, digest: str) -> None:
        self.data_digest = self.resumed_data_digest = digest

    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int | None = None,
        epochs: int = 1,
        shuffle: bool = True,
        sample_weight: Any = None,
        steps_per_epoch: int | None = None,
        validation_data: Any = None,
        callbacks: Sequence[Any] | None = None,
        verbose: int = 1,
    ) -> History:
        """Train; returns one :class:`History` record per update (see ``tfreg_core.training``).

        ``x``/``y``: arrays, or dicts/tuples of arrays for multi-input/-output models, cut into
        micro-batches of ``batch_size`` (shuffled per epoch with ``seed``). Or ``y=None`` and
        ``x`` an iterable of micro-batches -- a ``tf.data.Dataset`` (prefetched; its tensors
        go to the step function without a host copy), a generator, a list -- yielding
        ``(x, y)`` or ``(x, y, sample_weight)``; unknown cardinality is fine,
        ``steps_per_epoch`` micro-batches make an epoch of an infinite one, and
        ``batch_size``/``sample_weight`` must be None (``shuffle`` does not apply: the data's
        order is used, as Keras does). See :class:`tfreg_core.training.StreamData` for
        resuming mid-epoch. ``validation_data``: ``(x, y)`` / ``(x, y, sample_weight)`` arrays
        (in batches of ``batch_size``, 32 for streams) or an iterable of such micro-batches,
        evaluated after each epoch's last update; ``history.epochs`` gets ``val_loss``,
        ``val_data_loss`` and the metrics. ``callbacks``: ``keras.callbacks.Callback`` objects
        (Keras' hooks: ``on_train_batch_end`` once per update, ``on_epoch_end`` with the epoch
        logs, ``model.stop_training`` honoured; ``self.model`` is the trained model as the
        callbacks see it in Keras fit: its attributes, with the trainer's optimizer as
        ``optimizer``, so ``LearningRateScheduler``, ``ReduceLROnPlateau`` and ``TensorBoard``
        work and a rate they set applies from the next update) and/or
        the project's hooks (``tfreg_core.training.HOOKS``), all checked before training.

        Under a ``tf.distribute`` strategy (see :mod:`tfreg.distributed`) ``batch_size`` -- or
        a dataset's batches -- is the global micro-batch: pass the same arrays or
        ``tf.data.Dataset`` on every worker, not a distributed dataset; each replica trains
        on its share.
        """
        if isinstance(x, tf.distribute.DistributedDataset):
            raise InvalidArgumentError(
                "Pass the tf.data.Dataset of global micro-batches itself (the same on every "
                "worker): the Trainer gives each replica its share of each micro-batch and "
                "counts the window globally. Received: x=DistributedDataset (from "
                "experimental_distribute_dataset / distribute_datasets_from_function)"
            )
        data = fit_data(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            epochs=epochs,
            shuffle=shuffle,
            verbose=verbose,
            steps_per_epoch=steps_per_epoch,
        )
        validation = validation_batches(validation_data, batch_size)
        keras_callbacks = [c for c in callbacks or () if isinstance(c, keras.callbacks.Callback)]
        hooks: list[Any] = [_FinalizeVariables()]  # first: before the callbacks' train end
        hooks += [c for c in callbacks or () if not isinstance(c, keras.callbacks.Callback)]
        if keras_callbacks:
            model = CallbackModel(self.model, self.optimizer)
            hooks.append(KerasCallbacks(keras_callbacks, model, epochs, data, verbose))
        if isinstance(data, StreamData) and isinstance(data.data, tf.data.Dataset):
            data.data = data.data.prefetch(tf.data.AUTOTUNE)
        if self._replicas is not None and isinstance(data, ArrayData):
            arrays = (data.x, data.y, data.sample_weight)
            self._replicas.check_plan(data.plan, self.spec, arrays)
        elif isinstance(data, ArrayData) and data.batch_size >= data.num_examples:
            data.take_rows = _FullBatch(data)
        self.build(_input_shape(data))
        engine = self._engine
        assert engine is not None  # build() made it
        if validation is not None and not _one_shot(validation_data):
            engine.check_validation(validation)
        if isinstance(data, ArrayData):
            checks.check_labels(self.model, self._terms, self.loss, data.y)
        if self._replicas is not None:
            state = [*self.model.weights, *self.optimizer.variables, engine.window.state.position]
            self._replicas.check_state(state)
            if isinstance(data, StreamData):
                engine.stream_length = _stream_length(data)
        return run_fit(
            engine,
            self,
            self.spec,
            data,
            epochs=epochs,
            callbacks=hooks,
            verbose=verbose,
            validate=None if validation is None else lambda: engine.evaluate(validation()),
        )

    def trace_counts(self) -> dict[str, int]:
        """How often each step function was traced (constant after the first update): the
        update (``"apply"``) and the micro-batch step (``"micro"``), one per input signature;
        with ``accumulation_steps=1`` one fused function is both, counted in each."""
        self.build()
        assert self._engine is not None  # build() made it
        engine = self._engine

        def traces(functions: Any) -> int:
            return sum(f.experimental_get_tracing_count() for f in functions)

        # A fused window of one micro-batch (accumulation_steps=1) is both steps in one graph:
        # its traces count as a micro-batch step's and an update's.
        fused = traces(engine.fused_fns.values())
        return {
            "apply": engine.apply_fn.experimental_get_tracing_count() + fused,
            "micro": traces(engine.micro_fns.values()) + fused,
        }

    def get_config(self) -> dict[str, Any]:
        """The keyword arguments (model, loss and optimizer are positional and not included)."""
        config = self.spec.get_config()
        config["regularizer"] = object_config(self.regularizer)
        config["proximal"] = object_config(self.proximal)
        config["loss_weights"] = self.loss_weights
        config["batchnorm"] = self.batchnorm
        return config


class _FinalizeVariables:
    """What Keras ``fit`` does after its last epoch, before ``on_train_end``:
    ``optimizer.finalize_variable_values(trainable variables)`` -- with ``use_ema=True`` the
    weights become their moving averages (without, nothing happens)."""

    def on_train_end(self, trainer: Trainer, history: History) -> None:
        assert trainer._engine is not None  # fit built it before the first epoch
        trainer.optimizer.finalize_variable_values(trainer._engine.variables)


class _FullBatch:
    """``ArrayData.take_rows`` of a full-batch fit: all rows in order are the array itself,
    converted to a tensor without NumPy's indexing copy; shuffled rows by NumPy's indexing.
    Converted at every step, never once per fit: values a callback changes in place between
    epochs are trained on, as with micro-batches and in torchref."""

    def __init__(self, data: ArrayData) -> None:
        self.in_order = not data.shuffle

    def __call__(self, array: np.ndarray, idx: np.ndarray) -> Any:
        if self.in_order and len(idx) == array.shape[0]:  # all rows, in order
            return tf.convert_to_tensor(array)
        return array[idx]


def _stream_length(data: StreamData) -> int:
    # Micro-batches per epoch where known (compared across workers), else -1.
    if data.steps_per_epoch is not None:
        return data.steps_per_epoch
    if isinstance(data.data, tf.data.Dataset):
        return int(data.data.cardinality())  # -1 unknown, -2 infinite
    return len(data.data) if hasattr(data.data, "__len__") else -1


def _input_shape(data: ArrayData | StreamData) -> Any:
    # Builds an unbuilt model from the data's shapes (a dataset's element_spec: nothing is
    # consumed); a generic iterable needs a built model.
    if isinstance(data, ArrayData):
        x = data.x
    elif isinstance(data.data, tf.data.Dataset):
        x = unpack_micro_batch(data.data.element_spec)[0]
    else:
        return None
    shapes = tf.nest.map_structure(lambda v: (None, *v.shape[1:]), x)
    return shapes


def _one_shot(data: Any) -> bool:
    # An iterator (a generator) is not peeked at: its first batch would be lost.
    return not isinstance(data, tuple) and iter(data) is data
