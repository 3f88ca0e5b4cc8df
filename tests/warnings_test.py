"""The library raises no warning of its own under the tested versions.

`setup.cfg` turns warnings attributed to the library's modules into errors;
this test also catches the ones the library triggers inside Keras, NumPy or
TensorFlow (a NumPy 2 `__array__` deprecation, say), which are attributed
to those packages.
"""

import warnings

import keras
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import distributed_run

# Keras's own, raised for any `fit` on a dataset (its `shuffle=True` default).
# (Keras's `Model.save` on TensorFlow also warns under NumPy 2, for any
# model, so saving is not part of this test.)
KERAS_OWN = ("`shuffle=True` was passed, but will be ignored",)


class NoWarningsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        (kind, kind)
        for kind in distributed_run.KINDS
        if kind not in distributed_run.DIFFUSION
    )
    def test_fit_and_evaluate_warn_nothing(self, kind):
        _warn_nothing(self, kind)


# The UNet configurations cost two CPU-minutes of the fast tier's budget
# (README): the slow tier checks them, on both backends.
@pytest.mark.slow
class DiffusionNoWarningsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        (kind, kind) for kind in distributed_run.DIFFUSION
    )
    def test_fit_and_evaluate_warn_nothing(self, kind):
        _warn_nothing(self, kind)


def _warn_nothing(test, kind):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = distributed_run.distiller(keras, ksd, kind)
        data = distributed_run.data(ksd, kind)
        model.fit(data, epochs=2, verbose=0)
        if all(term.evaluates for term in model.terms):
            model.evaluate(data.take(1), verbose=0)
    messages = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if not any(own in str(w.message) for own in KERAS_OWN)
    ]
    test.assertEqual(messages, [])
