"""Smoke test of examples/tf_gradient_accumulation.py. Its data come from examples/_common.py,
whose MNIST reader and digits fallback tests/test_examples.py covers."""

from __future__ import annotations

import sys
from pathlib import Path

# The examples package lives at the repository root, which plain `pytest` does not put on
# sys.path (only `python -m pytest` does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import _common, masked_sequence_accumulation, tf_gradient_accumulation


def test_example_uses_the_shared_loader() -> None:
    assert tf_gradient_accumulation.load_mnist is _common.load_mnist
    assert not hasattr(tf_gradient_accumulation, "read_idx")


def test_example_runs_and_saves_the_plot(tmp_path, capsys) -> None:
    threads = tf_gradient_accumulation.torch.get_num_threads()  # main() pins torch to one thread
    try:
        argv = ["--out", str(tmp_path), "--epochs", "1", "--limit", "300"]
        assert tf_gradient_accumulation.main([*argv, "--checkpoints", str(tmp_path / "ck")]) == 0
    finally:
        tf_gradient_accumulation.torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "scikit-learn digits" in out and "300 training images (8, 8, 1), 297 test" in out
    assert "4x64" in out and "1x256" in out and "test accuracy" in out
    for twin in ("tf", "torch"):  # one crash-safe checkpoint per epoch and trainer
        assert (tmp_path / "ck" / "4x64" / twin / "latest").read_text() == "ckpt-0"
    assert "seed loop (WRONG)" in out and "Keras built-in, schedule (biased)" in out
    assert (tmp_path / "accumulation_loss.png").stat().st_size > 1000


def test_bias_runs_show_the_bias() -> None:
    """300 examples = 4 micro-batches of 64 + one of 44: per epoch one full window and a short one.
    The first update is a full window in every set-up but the seed loop, so Keras' built-in
    accumulation matches the exact run there (float32 round-off, 1e-5) and departs afterwards."""
    rng = tf_gradient_accumulation.seed_everything(0)
    x = rng.normal(size=(300, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=300)
    state = rng.bit_generator.state

    def fresh_pair():
        rng.bit_generator.state = state
        return tf_gradient_accumulation.build_cnn(dtype="float32", rng=rng, input_shape=(8, 8, 1))

    curves = tf_gradient_accumulation.bias_runs(fresh_pair, x, y, epochs=2, seed=0)
    exact, keras_builtin = curves["tfreg 4x64 exact"], curves["Keras built-in (biased)"]
    assert len(exact) == 1 + 4  # 2 windows x 2 epochs, the short ones applied
    assert len(keras_builtin) == 1 + 2  # 10 micro-steps: 2 updates, 2 micro-batches carried
    assert len(curves["seed loop (WRONG)"]) == 1 + 2  # leftovers dropped: one window per epoch
    assert abs(keras_builtin[1] - exact[1]) < 1e-5 * exact[1]
    assert abs(keras_builtin[2] - exact[2]) > 1e-4  # its 2nd: the 44 averaged with epoch 2
    # The schedule: Keras' built-in drops the rate at the micro-step counter, 4x too early.
    sched, keras_sched = (
        curves["tfreg 4x64 exact, schedule"],
        curves["Keras built-in, schedule (biased)"],
    )
    assert abs(keras_sched[2] - sched[2]) > 1e-3


def test_masked_sequence_example_is_exact_and_shows_keras_bias(capsys) -> None:
    # 30 = 24 + 6: one full window and a short one. float64: round-off only (<= 1e-12, measured
    # ~1e-17); Keras' built-in accumulation averages masked means and is off by > 1e-4.
    assert masked_sequence_accumulation.main(["--examples", "30", "--epochs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    gap = {line.split("  ")[1].strip(): float(line.split()[-1]) for line in lines[2:]}
    assert gap["tfreg.Trainer 3x8 (exact)"] <= 1e-12
    assert gap["Keras built-in 3x8 (biased)"] > 1e-4
    assert gap["initial weights (the size of the training's change)"] > 1e-3
