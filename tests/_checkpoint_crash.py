"""SIGKILL a checkpoint writer at random moments; every restore must find a valid checkpoint.

``python _checkpoint_crash.py {tf,torch} DIRECTORY KILLS SEED``. The framework is imported once
here; each round forks a child that restores the latest checkpoint (reporting the counter it
holds, in the model's bias), then saves counter+1, counter+2, ... back to back through the
twin's ``CheckpointManager`` until it is killed with SIGKILL at a random moment. This process
runs no TensorFlow op itself (a fork after TensorFlow ran ops is unsafe; torch is warmed up
here, as its DataLoader workers are forked), so children start in a fraction of a second.
Prints ``ok <kills> <last counter>``; exits 1 on any failed restore or on a completed save
that the next restore does not see.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from typing import Any


def _trainer(twin: str) -> tuple[Any, Any, Any]:
    """(trainer, set_counter, get_counter) on a tiny model."""
    if twin == "torch":
        import torch

        import torchref

        torch.set_num_threads(1)
        model = torch.nn.Linear(3, 1)
        trainer = torchref.Trainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.1))

        def set_counter(k: int) -> None:
            with torch.no_grad():
                model.bias.fill_(float(k))

        return trainer, set_counter, lambda: int(model.bias.item())
    import keras

    import tfreg

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    trainer = tfreg.Trainer(model, "mse", keras.optimizers.SGD(0.1))
    trainer.build((None, 3))
    bias = model.layers[-1].bias
    return trainer, lambda k: bias.assign([float(k)]), lambda: int(bias.numpy()[0])


def _manager(twin: str, trainer: Any, directory: str) -> Any:
    if twin == "torch":
        import torchref

        return torchref.CheckpointManager(trainer, directory)
    import tfreg

    return tfreg.CheckpointManager(trainer, directory)


def _child(twin: str, directory: str, write_fd: int, loop: bool) -> None:
    try:
        trainer, set_counter, get_counter = _trainer(twin)
        manager = _manager(twin, trainer, directory)
        counter = get_counter() if manager.restore() is not None else 0
        os.write(write_fd, f"restored {counter}\n".encode())
        while loop:
            counter += 1
            set_counter(counter)
            manager.save()
            os.write(write_fd, f"saved {counter}\n".encode())
    except BaseException as error:  # reported to the parent, which fails
        os.write(write_fd, f"error {type(error).__name__}: {error}\n".encode())
        os._exit(1)
    os._exit(0)


def _round(twin: str, directory: str, rng: random.Random, loop: bool) -> tuple[int, int]:
    """(counter restored, last counter whose save() returned before the kill)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(twin, directory, write_fd, loop)
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    first = reader.readline().split()
    if not first or first[0] != "restored":
        os.waitpid(pid, 0)
        raise SystemExit(f"restore failed: {' '.join(first)} {reader.read()}")
    saved = int(first[1])
    if loop:
        saves = rng.randint(1, 4)  # kill after a few saves, at a random moment within one
        for _ in range(saves):
            line = reader.readline()
            if not line.startswith("saved"):
                raise SystemExit(f"writer failed: {line}{reader.read()}")
            saved = int(line.split()[1])
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    reader.close()
    return int(first[1]), saved


def main() -> None:
    twin, directory, kills, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if twin == "torch":  # warmed up here: torch's DataLoader workers fork after ops too
        import torch

        torch.set_num_threads(1)
        _trainer(twin)
    else:
        import tfreg  # noqa: F401  (imports TensorFlow and Keras; no op runs here)
    rng = random.Random(seed)
    durable = 0  # every save() that returned must survive the kill that follows it
    for i in range(kills + 1):  # the last round only restores
        restored, saved = _round(twin, directory, rng, loop=i < kills)
        if restored < durable:
            raise SystemExit(f"a completed save was lost: restored {restored} after {durable}")
        durable = saved
    print(f"ok {kills} {durable}")


if __name__ == "__main__":
    main()
