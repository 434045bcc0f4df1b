"""Device names for parity runs: "cpu" or "gpu", mapped to each framework's spelling."""

from __future__ import annotations

from tfreg._compat import tf

DEVICES = ("cpu", "gpu")


def tf_gpu_visible() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def torch_gpu_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def available_devices() -> list[str]:
    """ "cpu", plus "gpu" when *both* frameworks see one (a parity run needs both on it)."""
    return ["cpu", "gpu"] if tf_gpu_visible() and torch_gpu_visible() else ["cpu"]


def tf_device(device: str) -> str:
    """TensorFlow device string for "cpu"/"gpu"."""
    return {"cpu": "/CPU:0", "gpu": "/GPU:0"}[_checked(device)]


def torch_device(device: str) -> str:
    """torch device string for "cpu"/"gpu"."""
    return {"cpu": "cpu", "gpu": "cuda"}[_checked(device)]


def _checked(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}. Received: device={device!r}")
    return device
