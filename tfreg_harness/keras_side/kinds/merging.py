"""Parameter-free graph ops: the merge layers (Add, Subtract, Multiply, Average, Maximum, Minimum,
Concatenate). torch writes them as code in ``forward`` (``x + y``, ``torch.cat``), so they pair
with no module: they are compared through the outputs of the paired layers around them, and the
first diverging *paired* layer is named."""

from __future__ import annotations

from tfreg_harness.keras_side.kinds._common import L
from tfreg_harness.keras_side.registry import register_layer_pair

MERGE_LAYERS = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate)

for _merge in MERGE_LAYERS:
    # torch_layout "input": torch's ``x + y`` / ``torch.cat(dim=1)`` keeps the maps' layout
    register_layer_pair(_merge, (), torch_optional=True)
