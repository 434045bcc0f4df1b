"""A group of consecutive torch leaves that one Keras layer pairs with (``torch_group`` of
:func:`tfreg.parity.register_layer_pair`): a SeparableConv2D ported as a depthwise
``nn.Conv2d`` followed by a pointwise 1x1 ``nn.Conv2d``.

The group stands for the chain first leaf -> last leaf: its input is the first leaf's, its
output the last leaf's (forward hooks go there), its parameters are the leaves' parameters, and
its children carry the kind's part names (``depthwise``, ``pointwise``) so a transfer map names
``"pointwise.weight"``. It is never called itself and never added to the user's module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn


class TorchGroup(nn.Module):
    """``parts``: ``(part name, leaf name in the user's module, leaf)`` in forward order;
    ``owner``: the module holding all of them (its attributes -- a hand-written attention's
    ``num_heads`` -- are configuration a kind's check may read)."""

    def __init__(self, parts: Sequence[tuple[str, str, nn.Module]], owner: nn.Module) -> None:
        super().__init__()
        self.leaf_names = {part: name for part, name, _ in parts}
        self.owner = (owner,)  # a tuple: not registered as a child (it is no part)
        for part, _, module in parts:
            self.add_module(part, module)

    def _leaf(self, position: int) -> nn.Module:
        return list(self.children())[position]

    def qualified(self, path: str) -> str:
        """``"pointwise.weight"`` -> the user's ``state_dict`` key (``"sep.1.weight"``)."""
        part, _, rest = path.partition(".")
        name = self.leaf_names[part]
        return f"{name}.{rest}" if name else rest

    def register_forward_hook(self, hook: Callable[..., Any], **kwargs: Any) -> Any:
        return self._leaf(-1).register_forward_hook(
            lambda _m, inputs, output: hook(self, inputs, output), **kwargs
        )

    def register_forward_pre_hook(self, hook: Callable[..., Any], **kwargs: Any) -> Any:
        return self._leaf(0).register_forward_pre_hook(
            lambda _m, inputs: hook(self, inputs), **kwargs
        )


__all__ = ["TorchGroup"]
