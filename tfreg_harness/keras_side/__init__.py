"""The Keras side of the parity harness: it drives a Keras model and its torch port together, so
it sees both frameworks (torch imported lazily, when the first layer pairing loads the built-in
kinds or a check needs it).

- :mod:`.api`: ``check_parity`` / ``assert_parity`` for any Keras model and torch module.
- :mod:`.registry`: ``register_layer_pair`` -- layer kinds as data; :mod:`.kinds` registers the
  built-in ones.
- :mod:`.pairing`: pairing layers in definition order, configuration checks.
- :mod:`.transfer`: parameter pairs and weight transfer.
- :mod:`.capture`: per-layer outputs and Dropout masks while a model runs.
- :mod:`.models`: evaluation (logits, loss, gradients, per-layer outputs) and the seed model
  pairs; :mod:`.architecture` builds the Keras seed models.
- :mod:`.checks`, :mod:`.cli`, :mod:`.record`: the ``tfreg-parity`` matrix, its command line and
  the bundles it records for :mod:`tfreg_harness.torch_side.verify`.
- :mod:`.pytest_plugin`: the ``parity`` fixture.

This package's ``__init__`` imports nothing, so that pytest can load the plugin in every session
without TensorFlow; the public names are re-exported by :mod:`tfreg.parity`.
"""
