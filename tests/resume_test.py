import os
import signal
import sys

import keras
import numpy as np
import pytest
from absl.testing import absltest

from tests import distributed_run
from tests import watchdog

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
class ResumeTest(absltest.TestCase):
    """SIGKILL mid-epoch, restart with BackupAndRestore: same end state."""

    def test_killed_and_resumed_runs_match_uninterrupted_ones(self):
        folder = self.create_tempdir().full_path
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

        def start(mode, *kinds):
            return watchdog.popen(
                [sys.executable, "-m", "tests.resume_run", mode, folder]
                + list(kinds),
                env=env,
                cwd=_ROOT,
                timeout=600,
            )

        kinds = distributed_run.KINDS
        if keras.backend.backend() == "jax":
            # Within the suite's time budget: under JAX the teachers that
            # keep state of their own besides trained weights, the
            # consistency term's EMA target network and the distribution
            # matching term's fake score and its optimizer; every kind runs
            # under TensorFlow.
            kinds = (
                "ema",
                "snapshot",
                "past_predictions",
                "consistency",
                "distribution_matching",
            )
        # A kill ends its process: one process per configuration.
        killed = [start("kill", kind) for kind in kinds]
        codes = [watchdog.wait(process) for process in killed]
        self.assertEqual(codes, [-signal.SIGKILL] * len(kinds))
        for mode in ("full", "resume"):
            self.assertEqual(watchdog.wait(start(mode, *kinds)), 0, mode)
        for kind in kinds:
            path = os.path.join(folder, f"full_{kind}.npz")
            with np.load(path, allow_pickle=False) as full:
                full = dict(full)
            path = os.path.join(folder, f"resume_{kind}.npz")
            with np.load(path, allow_pickle=False) as resumed:
                resumed = dict(resumed)
            self.assertEqual(sorted(full), sorted(resumed), kind)
            # The restart trained epochs 3 and 4 only, from the backup of
            # epoch 2 (the killed epoch 3 is rerun from its start).
            self.assertEqual(int(full.pop("epochs_run")), 4)
            self.assertEqual(int(resumed.pop("epochs_run")), 2, kind)
            for key in full:
                np.testing.assert_allclose(
                    resumed[key], full[key], rtol=0, atol=1e-6, err_msg=kind
                )
