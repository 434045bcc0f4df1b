"""What a parity result was measured with: library versions and the machine (for JSON/JUnit).

A parity number without the versions and the device it came from cannot be compared with the
next run's, so every report the CLI writes carries both.
"""

from __future__ import annotations

import os
import platform
import sys

from tfreg._compat import keras, tf

__all__ = ["machine", "versions"]


def versions() -> dict[str, str | None]:
    """Versions of Python, NumPy, TensorFlow, Keras, torch and tfreg (``None``: not installed)."""
    import numpy as np

    import tfreg

    try:
        import torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch": torch_version,
        "tfreg": tfreg.__version__,
    }


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model there.
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """Platform, CPU model and count, and the devices each framework sees (by name)."""
    tf_devices = []
    for device in tf.config.list_physical_devices():
        details = (
            tf.config.experimental.get_device_details(device) if device.device_type == "GPU" else {}
        )
        tf_devices.append(
            f"{device.name} ({details['device_name']})" if "device_name" in details else device.name
        )
    torch_devices = ["cpu"]
    try:
        import torch

        torch_devices += [
            f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
        ]
    except ImportError:
        torch_devices = []
    return {
        "platform": platform.platform(),
        "python_implementation": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "devices": {"tensorflow": tf_devices, "torch": torch_devices},
    }
