"""The composition root: builds a run from its configuration and runs it on a Flower runtime.

``fedkd`` (the library: data, models, distillation, privacy, results) sits at the bottom;
``strategies`` and ``generators`` build on it; this package composes them into the Flower
``ServerApp`` and ``ClientApp``, the in-process engine and the ``fedkd-sim`` command. Nothing
below imports from here.
"""
