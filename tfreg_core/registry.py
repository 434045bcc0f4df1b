"""String keys for regularizers, shared by ``tfreg.get`` and ``torchref.get``.

Keras 3 accepts a class name and its snake_case ("L1L2", "l1l2"); we accept the same, plus
"l1_l2", which Keras 3's own docstring promises but its lookup rejects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tfreg_core.validation import InvalidArgumentError

_KEYS: dict[str, str] = {
    "l1": "L1",
    "l2": "L2",
    "l1l2": "L1L2",
    "l1_l2": "L1L2",
    "orthogonal_regularizer": "OrthogonalRegularizer",
    "p_norm": "PNorm",
    "group_lasso": "GroupLasso",
}
CLASS_NAMES = frozenset(_KEYS.values())


def class_name_for(key: str) -> str | None:
    """The class name a string key refers to, or None."""
    return key if key in CLASS_NAMES else _KEYS.get(key)


def lookup_table(classes: Mapping[str, type[Any]]) -> dict[str, type[Any]]:
    """Every name a config's ``class_name`` may use -> class: class names and string keys."""
    return {**classes, **{key: classes[name] for key, name in _KEYS.items() if name in classes}}


def resolve(
    identifier: Any,
    classes: Mapping[str, type[Any]],
    from_dict: Callable[[dict[str, Any]], Any],
) -> Any:
    """Keras' ``regularizers.get`` algorithm over one framework's ``classes`` (by class name)."""
    if identifier is None:
        return None
    obj = identifier
    if isinstance(identifier, dict):
        # Keras' deserializer returns the bare class_name string for an unknown name; the callable
        # check below turns that into the same error Keras' ``get`` raises.
        obj = from_dict(identifier)
    elif isinstance(identifier, str):
        name = class_name_for(identifier)
        obj = classes.get(name) if name else None
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as err:  # a required argument (GroupLasso's axis has no default)
            raise InvalidArgumentError(
                f"{identifier!r} cannot be built without arguments ({err}): pass a config, e.g. "
                f"{{'class_name': {obj.__name__!r}, 'config': {{...}}}}, or the object itself. "
                f"Received: identifier={identifier!r}"
            ) from None
    if not callable(obj):
        raise InvalidArgumentError(f"Could not interpret regularizer identifier: {identifier}")
    return obj


def to_dict(regularizer: Any, classes: Mapping[str, type[Any]]) -> dict[str, Any]:
    """``{"class_name", "config"}`` -- the part of Keras' serialized form both frameworks read."""
    name = type(regularizer).__name__
    if classes.get(name) is not type(regularizer):
        raise InvalidArgumentError(
            f"Only this package's regularizers ({', '.join(sorted(classes))}) can be serialized. "
            f"Received: regularizer={regularizer!r}"
        )
    return {"class_name": name, "config": regularizer.get_config()}


def from_dict(config: Any, classes: Mapping[str, type[Any]]) -> Any:
    """The regularizer a ``{"class_name": ..., "config": {...}}`` dict describes. Keras' extra
    keys (``module``, ``registered_name``) are ignored, so tfreg's and Keras' output loads too;
    ``class_name`` may be a class name or a string key."""
    if not isinstance(config, dict):
        raise InvalidArgumentError(
            f"Expected a dict with 'class_name' and 'config'. Received: config={config!r}"
        )
    name = class_name_for(str(config.get("class_name", "")))
    if name is None or name not in classes:
        raise InvalidArgumentError(f"Could not interpret regularizer identifier: {config}")
    return classes[name].from_config(config.get("config", {}))
