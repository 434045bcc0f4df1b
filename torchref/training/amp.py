"""Mixed precision for ``torchref.Trainer``: the ``autocast`` argument, the checks that the master
weights and options fit together, and :class:`LossScale` (torch.amp.GradScaler's rule, once per
window)."""

from __future__ import annotations

from typing import Any

from tfreg_core.training import TrainerSpec
from tfreg_core.validation import InvalidArgumentError
from torchref._compat import torch

__all__ = ["LossScale"]

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast_dtype(autocast: Any) -> torch.dtype | None:
    if autocast is None:
        return None
    dtype = _AUTOCAST_DTYPES.get(autocast) if isinstance(autocast, str) else autocast
    if dtype not in _AUTOCAST_DTYPES.values():
        raise InvalidArgumentError(
            "autocast must be None, 'bfloat16', 'float16', torch.bfloat16 or torch.float16. "
            f"Received: autocast={autocast!r}"
        )
    return dtype


class LossScale:
    """Loss scaling under ``autocast``, once per window. ``autocast="float16"``: dynamic,
    torch.amp.GradScaler's rule (``init_scale``, ``growth_factor``, ``backoff_factor``,
    ``growth_interval``, read from a ``torch.amp.GradScaler`` when one is given) applied to
    the accumulated window::

        backward(scale / u * sum(w * l))  per micro-batch   (u: see ``unit``)
        g = sums / (N_W * scale / u)      once per window (unscale)
        non-finite g: the window is skipped (weights and optimizer state untouched),
                      scale *= backoff_factor, tracker = 0
        else: step; tracker += 1; tracker == growth_interval: scale *= growth_factor, tracker = 0

    ``u`` (``unit``) is fixed at a window's first micro-batch: its loss-element count times
    ``accumulation_steps``, i.e. ``N_W`` for equal micro-batches. It makes each micro-batch's
    float16 backward carry the values a GradScaler loop's ``backward(scale * mean over W)``
    carries, so the two overflow on the same windows (the micro-batch's *sum* times ``scale``
    would overflow ``log2(N_W)`` halvings earlier). The scale and tracker live on the host:
    no synchronisation beyond the finiteness check every update already has.

    ``autocast="bfloat16"`` (``dynamic=False``): ``scale`` stays 1 and only ``u`` applies, so
    each micro-batch's bf16 backward carries the values of the plain loop's ``backward(mean)``
    and every bf16 rounding falls where the loop's does (one micro-batch per window with a
    host count: bitwise, whatever the count; back-propagating the sum and dividing afterwards
    was 8e-3 off). Where the count is a device tensor (a ``mask``, class weights on the GPU),
    ``u`` is the micro-batch size times ``accumulation_steps``: no host sync, one rounding."""

    def __init__(self, scaler: Any = None, *, dynamic: bool = True) -> None:
        self.dynamic = dynamic
        if not dynamic:  # bfloat16: float32's range, no scaling, only the unit
            self.scale, self.growth_factor, self.backoff_factor = 1.0, 1.0, 1.0
            self.growth_interval, self.growth_tracker, self.unit = 1, 0, 1.0
            return
        if scaler is None:
            scaler = torch.amp.GradScaler("cpu")  # its defaults; only its settings are read
        if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
            raise InvalidArgumentError(
                "grad_scaler must be an enabled torch.amp.GradScaler (its init_scale, "
                "growth_factor, backoff_factor and growth_interval are used once per window). "
                f"Received: grad_scaler={scaler!r}"
            )
        self.scale = float(scaler.get_scale())
        self.growth_factor = float(scaler.get_growth_factor())
        self.backoff_factor = float(scaler.get_backoff_factor())
        self.growth_interval = int(scaler.get_growth_interval())
        self.growth_tracker = 0
        self.unit = 1.0

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "unit": self.unit}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.unit = float(state["unit"])


def _check_mixed_precision(
    model: torch.nn.Module, autocast: torch.dtype | None, grad_scaler: Any, spec: TrainerSpec
) -> LossScale | None:
    """The loss scale ``autocast`` trains with (None without autocast), after checking that
    the master weights are float32 and the options fit together."""
    if grad_scaler is not None and autocast != torch.float16:
        raise InvalidArgumentError(
            "grad_scaler configures the loss scaling of autocast='float16' (bfloat16 has "
            f"float32's range and needs none). Received: grad_scaler={grad_scaler!r} with "
            f"autocast={autocast}"
        )
    if autocast is None:
        return None
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    if dtypes != ["torch.float32"]:
        raise InvalidArgumentError(
            "autocast trains float32 master weights (and float32 accumulators) with "
            f"{autocast} forward ops: the model's parameters must be float32. Received: "
            f"parameter dtypes {dtypes}"
        )
    if autocast != torch.float16:
        return LossScale(dynamic=False)
    if spec.on_nonfinite == "raise":
        raise InvalidArgumentError(
            "autocast='float16' skips each window whose scaled gradient overflows and lowers "
            "the loss scale (as torch.amp.GradScaler); on_nonfinite='raise' would stop at the "
            "first overflow. Received: on_nonfinite='raise' with autocast=torch.float16"
        )
    return LossScale(grad_scaler)


def _refuse_outer_autocast(device: torch.device) -> None:
    # Autocast around fit caches low-precision copies of the weights for the whole context:
    # after the first step every forward would read stale copies (silently wrong updates).
    for device_type in dict.fromkeys(("cpu", "cuda", device.type)):
        if torch.is_autocast_enabled(device_type):
            raise InvalidArgumentError(
                "fit() was called inside torch.autocast: its weight cache would go stale after "
                "the first update. Call fit outside it and pass Trainer(..., "
                "autocast=torch.bfloat16) or autocast='float16' (with loss scaling) instead. "
                f"Received: autocast enabled on {device_type!r}"
            )
