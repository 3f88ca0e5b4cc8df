import os
import signal
import sys

from absl.testing import absltest

from tests import tiny
from tests import watchdog

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child whose second thread waits forever, as a collective would.
_HANG = """
import threading, time
{arm}
def waits_for_a_collective():
    threading.Event().wait()
threading.Thread(target=waits_for_a_collective, daemon=True).start()
time.sleep(600)
"""


@tiny.ONCE
class WatchdogTest(absltest.TestCase):
    def test_an_armed_child_dumps_every_thread_and_exits(self):
        arm = "from tests import watchdog; watchdog.arm()"
        result = watchdog.run(
            [sys.executable, "-c", _HANG.format(arm=arm)],
            capture_output=True,
            text=True,
            cwd=_ROOT,
            timeout=10,
        )
        # Dumped at 9 s, before the test's 10 s, and exited.
        self.assertEqual(result.returncode, 1)
        self.assertIn("Timeout (0:00:09)!", result.stderr)
        self.assertIn("in waits_for_a_collective", result.stderr)
        self.assertIn("in <module>", result.stderr)

    def test_a_child_that_did_not_arm_is_aborted_with_its_stacks(self):
        with self.assertRaises(AssertionError) as failure:
            watchdog.run(
                [sys.executable, "-c", _HANG.format(arm="")],
                capture_output=True,
                text=True,
                cwd=_ROOT,
                timeout=5,
            )
        message = str(failure.exception)
        self.assertIn("did not end in 5 s", message)
        self.assertIn("Fatal Python error: Aborted", message)
        self.assertIn("in waits_for_a_collective", message)

    def test_wait_aborts_a_started_child(self):
        process = watchdog.popen(
            [sys.executable, "-c", _HANG.format(arm="")], cwd=_ROOT, timeout=5
        )
        with self.assertRaisesRegex(AssertionError, "did not end in 5 s"):
            watchdog.wait(process)
        # Aborted, which makes `PYTHONFAULTHANDLER` dump the stacks.
        self.assertEqual(process.returncode, -signal.SIGABRT)


if __name__ == "__main__":
    absltest.main()
