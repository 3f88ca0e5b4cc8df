import importlib.util
import os
import pathlib

import nbclient
import nbformat
from absl.testing import parameterized

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


class TeacherStudentScriptTest(parameterized.TestCase):
    def test_runs_on_bundled_data(self):
        spec = importlib.util.spec_from_file_location(
            "teacher_student", EXAMPLES / "teacher_student.py"
        )
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        out = self.create_tempdir().full_path
        result = script.main(
            [
                "--data",
                "bundled",
                "--epochs",
                "1",
                "--teacher-epochs",
                "1",
                "--limit",
                "256",
                "--output-dir",
                out,
            ]
        )
        self.assertIn("expected_calibration_error", result)
        self.assertTrue(os.path.exists(os.path.join(out, "student.keras")))


class QuickstartNotebookTest(parameterized.TestCase):
    def test_executes(self):
        notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
        folder = self.create_tempdir().full_path
        os.environ["KSD_QUICK"] = "1"
        try:
            nbclient.NotebookClient(
                notebook,
                timeout=300,
                kernel_name="python3",
                resources={"metadata": {"path": folder}},
            ).execute()
        finally:
            del os.environ["KSD_QUICK"]
        last = notebook.cells[-1].outputs[0]["data"]["text/plain"]
        self.assertIn("accuracy", last)
        self.assertTrue(os.path.exists(os.path.join(folder, "student.keras")))
