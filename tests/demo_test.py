import contextlib
import io
import os
import sys

import keras
from absl.testing import parameterized

from keras_selfdistill import __main__
from keras_selfdistill import demo
from tests import tiny
from tests import watchdog


@tiny.ONCE
class DemoTest(parameterized.TestCase):
    def test_runs_and_saves_student(self):
        path = os.path.join(self.create_tempdir().full_path, "s.keras")
        plots = os.path.join(self.create_tempdir().full_path, "plots")
        rows = demo.run(
            seeds=2,
            epochs=1,
            teacher_epochs=1,
            output=path,
            limit=200,
            plot=plots,
        )
        for name in demo.PLOTS.values():
            with open(os.path.join(plots, name), "rb") as file:
                self.assertEqual(file.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertEqual(
            [row["model"] for row in rows],
            ["teacher (CNN)", "student, cross-entropy", "student, distilled"],
        )
        self.assertLen(rows[2]["accuracy"], 2)
        self.assertLess(rows[1]["params"], rows[0]["params"])
        student = keras.saving.load_model(path, safe_mode=True)
        self.assertEqual(student.name, "student")
        # An existing output is refused before any training.
        with self.assertRaisesRegex(FileExistsError, "--overwrite"):
            demo.run(seeds=1, epochs=1, output=path, limit=10)
        with self.assertRaisesRegex(FileExistsError, "--plot"):
            demo.run(seeds=1, epochs=1, output="", plot=plots, limit=10)

    def test_command_line_refuses_an_existing_output(self):
        path = os.path.join(self.create_tempdir().full_path, "s.keras")
        with open(path, "w") as file:
            file.write("not ours")
        # In this process: `test_command_line_usage` runs the command's
        # own process, and the refusal comes before any training.
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            code = __main__.main(["demo", "--output", path, "--limit", "10"])
        self.assertEqual(code, 1)
        self.assertIn("--overwrite", errors.getvalue())
        self.assertNotIn("Traceback", errors.getvalue())
        with open(path) as file:
            self.assertEqual(file.read(), "not ours")

    def test_help_describes_every_option(self):
        for action in demo.parser()._actions:
            self.assertTrue(action.help, msg=action.option_strings)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            with self.assertRaises(SystemExit) as exit_:
                __main__.main(["demo", "--help"])
        self.assertEqual(exit_.exception.code, 0)
        self.assertIn("--plot DIR", output.getvalue())

    def test_command_line_usage(self):
        result = watchdog.run(
            [sys.executable, "-m", "keras_selfdistill"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("demo", result.stderr)
