import os
import sys

import keras
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import distributed_run
from tests import tiny
from tests import watchdog

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DataParallelTest(parameterized.TestCase):
    """Every teacher and term: 2 devices equal 1 device within 1e-5."""

    @pytest.mark.slow
    def test_two_devices_match_one_tensorflow_mirrored_strategy(self):
        self._two_devices_match_one("tensorflow", "mirrored")

    # In the slow tier, beside the TensorFlow one. It hung once in a while
    # on a 2-core machine until the harness gave XLA's CPU client a pool of
    # 4 threads (`distributed_run.JAX_ENV`; issue 32).
    @pytest.mark.slow
    def test_two_devices_match_one_jax_data_parallel(self):
        self._two_devices_match_one("jax", "data_parallel")

    def _two_devices_match_one(self, backend, engine):
        if keras.backend.backend() != backend:
            self.skipTest(f"runs in the {backend} suite")
        out = os.path.join(self.create_tempdir().full_path, "out.npz")
        env = dict(
            os.environ,
            KERAS_BACKEND=backend,
            TF_CPP_MIN_LOG_LEVEL="3",
            **(distributed_run.JAX_ENV if backend == "jax" else {}),
        )
        watchdog.run(
            [sys.executable, "-m", "tests.distributed_run", engine, out],
            check=True,
            env=env,
            cwd=_ROOT,
            timeout=900,
        )
        with np.load(out, allow_pickle=False) as file:
            results = dict(file)
        for kind in distributed_run.KINDS:
            one = {k[2:]: v for k, v in results.items() if k[:2] == "1/"}
            two = {k[2:]: v for k, v in results.items() if k[:2] == "2/"}
            keys = [k for k in one if k.startswith(kind + "/")]
            self.assertEqual(
                keys, [k for k in two if k.startswith(kind + "/")], kind
            )
            # The logged losses are per-example values on both layouts,
            # not divided by the replica count.
            self.assertIn(f"{kind}/history/loss", keys)
            for key in keys:
                if key.endswith("bank_copies"):
                    continue
                np.testing.assert_allclose(
                    one[key], two[key], rtol=0, atol=1e-5, err_msg=key
                )
        # Every replica holds the whole past-prediction bank, every row
        # written (no +inf "unseen" mark left).
        copies = results["2/past_predictions/bank_copies"]
        self.assertLen(copies, 2)
        self.assertFalse(np.isinf(copies).any())
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(
            copies[0], results["1/past_predictions/bank_copies"][0], atol=1e-5
        )


# The configurations' types, whatever the backend: once.
@tiny.ONCE
class CoverageTest(absltest.TestCase):
    def test_every_teacher_and_term_has_a_configuration(self):
        # The configurations in `distributed_run.KINDS` drive the
        # multi-device, resume, XLA and mixed-precision tests; a new teacher
        # or term fails here until it is added to them.
        used = set()
        for kind in distributed_run.KINDS:
            distiller = distributed_run.distiller(keras, ksd, kind)
            used.update(type(term) for term in distiller.terms)
            used.update(type(teacher) for teacher in distiller.teachers)
        public = {
            getattr(module, name)
            for module in (ksd.teachers, ksd.terms)
            for name in module.__all__
        } - {ksd.teachers.Teacher, ksd.terms.Term}
        self.assertEqual(
            sorted(c.__name__ for c in public - used), [], "not covered"
        )
