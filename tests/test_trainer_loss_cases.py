"""Loss cases both trainers share, written once and run against both twins (``tf``, ``torch``).

Each twin says how its users make a loss element not count -- Keras: a mask (``Embedding(
mask_zero=True)`` feeding a per-timestep loss); torch: ``ignore_index`` labels (-100) -- and
supplies its own independent reference: plain Keras ``model.fit`` / a plain torch
``loss(model(X), Y).backward(); SGD.step()`` on the concatenated window (``tests/_twins.py``).
Everything else is the twins' shared public API. Each framework is imported only when its
twin's case runs.

Keras-only (masked denominators, ``AccumulatingModel``, schedules, clipping against Keras'
optimizer, mixed precision) and torch-only (loss modules as torch users build them) cases stay in
``test_training_losses.py`` / ``test_training_torch_losses.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _twins import EXACT, LR, Twin

from tfreg_harness import assert_close


@pytest.fixture
def float64(twin: Twin, request: pytest.FixtureRequest) -> None:
    """Keras computes in float64 for the case (torch's models are float64 by construction)."""
    if twin.name == "tf":
        request.getfixturevalue("float64_floatx")


def test_window_that_counts_nothing_is_a_zero_data_gradient_and_reported(twin, float64) -> None:
    # The framework's own mean is 0/0 = NaN there; the trainer applies a zero data gradient
    # (SGD: no change) and reports the window with elements 0, not skipped.
    model, x, y, counted_first = twin.uncounted_window()
    expected = twin.clone(model)
    twin.plain_step(expected, twin.cross_entropy(), x[:4], y[:4], LR)  # window 0 alone
    trained = twin.clone(model)
    after_first: list[list[np.ndarray]] = []

    class AfterFirstUpdate:
        def on_update_end(self, trainer: Any, record: dict[str, Any]) -> None:
            if record["update"] == 0:
                after_first.append(twin.weights(trainer.model))

    optimizer = twin.optimizer(trained, LR)
    t = twin.pkg.Trainer(trained, twin.cross_entropy(), optimizer, accumulation_steps=2)
    history = t.fit(x, y, batch_size=2, shuffle=False, callbacks=[AfterFirstUpdate()], verbose=0)
    first, second = history.records
    assert first["elements"] == counted_first
    assert (second["elements"], second["loss"], second["data_loss"], second["skipped"]) == (
        0.0,
        0.0,
        0.0,
        False,
    )
    for ours, ref, mid in zip(
        twin.weights(trained), twin.weights(expected), after_first[0], strict=True
    ):
        assert_close("weights", ours, ref, rtol=EXACT.rtol)
        np.testing.assert_array_equal(ours, mid)  # the empty window moved nothing
