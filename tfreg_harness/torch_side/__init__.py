"""The torch side of the parity harness, importable without TensorFlow: the torch seed models
(:mod:`.architecture`) and ``python -m torchref.verify`` (:mod:`.verify`), which checks a bundle
that TensorFlow recorded elsewhere (``tfreg_harness.keras_side.record``)."""
