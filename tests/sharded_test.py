"""Sharded teacher and student (`ModelParallel`, 8 devices) equal 1 device."""

import os
import sys

import keras
import numpy as np
import pytest
from absl.testing import absltest

from tests import watchdog

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
class ShardedTest(absltest.TestCase):
    def test_model_parallel_matches_one_device(self):
        if keras.backend.backend() != "jax":
            self.skipTest("runs in the jax suite")
        pytest.importorskip("keras_hub")
        out = os.path.join(self.create_tempdir().full_path, "out.npz")
        env = dict(
            os.environ,
            KERAS_BACKEND="jax",
            TF_CPP_MIN_LOG_LEVEL="3",
            XLA_FLAGS="--xla_force_host_platform_device_count=8",
        )
        watchdog.run(
            [sys.executable, "-m", "tests.sharded_run", out],
            check=True,
            env=env,
            cwd=_ROOT,
            timeout=900,
        )
        with np.load(out, allow_pickle=False) as file:
            results = dict(file)
        # The layouts were applied: the student's tied head split over
        # `model` (vocabulary) and `batch` (width), or replicated.
        self.assertIn(
            "spec=P('model', 'batch')", str(results["sharded/sharding"])
        )
        self.assertIn(
            "spec=P(None, None)", str(results["teacher_sharded/sharding"])
        )
        one = {k[4:]: v for k, v in results.items() if k.startswith("one/")}
        for layout in ("sharded", "teacher_sharded"):
            for key, value in one.items():
                if key == "sharding":
                    continue
                np.testing.assert_allclose(
                    results[f"{layout}/{key}"],
                    value,
                    rtol=0,
                    atol=1e-5,
                    err_msg=f"{layout}/{key}",
                )
        self.assertRegex(
            str(results["mismatch/error"]),
            r"splits the vocabulary of the teacher's head only.*"
            r"\(64, 16\).*None.*\(64, 16\).*model",
        )
