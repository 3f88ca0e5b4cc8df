import importlib.util
import os
import pathlib

import nbclient
import nbformat
import numpy as np
import pytest
from absl.testing import parameterized

from tests import tiny

# The example scripts and notebooks end to end: the slow tier (README,
# "Tests").
pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@tiny.ONCE
class CommandLineTest(parameterized.TestCase):
    @parameterized.parameters(
        "teacher_student",
        "auxiliary_exits",
        "self_distillation",
        "tuning",
        "cached_teacher",
    )
    def test_offline_default_and_every_option_described(self, name):
        parser = _load(name).build_parser()
        for action in parser._actions:
            self.assertTrue(action.help, msg=(name, action.option_strings))
        self.assertEqual(parser.parse_args([]).data, "bundled_mnist")


@tiny.ONCE
class TeacherStudentScriptTest(parameterized.TestCase):
    def test_runs_on_bundled_data(self):
        script = _load("teacher_student")
        out = self.create_tempdir().full_path
        result = script.main(
            [
                "--data",
                "bundled_mnist",
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


@tiny.ONCE
class AuxiliaryExitsScriptTest(parameterized.TestCase):
    def test_runs_on_bundled_data(self):
        out = self.create_tempdir().full_path
        result = _load("auxiliary_exits").main(
            [
                "--data",
                "bundled_mnist",
                "--epochs",
                "1",
                "--limit",
                "256",
                "--output-dir",
                out,
            ]
        )
        for name in ("block1", "block2", "block3"):
            self.assertIn(f"{name}_accuracy", result)
            self.assertTrue(
                os.path.exists(os.path.join(out, f"exit_{name}.keras"))
            )
        self.assertTrue(os.path.exists(os.path.join(out, "student.keras")))
        self.assertIn("early_exit_accuracy", result)


@tiny.ONCE
class SelfDistillationScriptTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("pskd", "pskd"),
        ("ema", "ema"),
        ("snapshot", "snapshot"),
        ("born_again", "born_again"),
    )
    def test_runs_on_bundled_data(self, method):
        out = self.create_tempdir().full_path
        result = _load("self_distillation").main(
            [
                "--method",
                method,
                "--data",
                "bundled_mnist",
                "--epochs",
                "1",
                "--limit",
                "256",
                "--label-noise",
                "0.2",
                "--output-dir",
                out,
            ]
        )
        self.assertIn("accuracy", result)
        self.assertTrue(
            os.path.exists(os.path.join(out, f"student_{method}.keras"))
        )


@tiny.ONCE
class TuningScriptTest(parameterized.TestCase):
    def test_searches_temperature_and_xi(self):
        out = self.create_tempdir().full_path
        result = _load("tuning").main(
            ["--max-trials", "2", "--epochs", "1", "--teacher-epochs", "1"]
            + ["--limit", "300", "--output-dir", out]
        )
        self.assertLen(result["trials"], 2)
        self.assertNotEqual(result["trials"][0], result["trials"][1])
        self.assertIn(result["best"]["temperature"], [1.0, 2.0, 4.0, 8.0])
        self.assertBetween(result["best"]["xi"], 0.1, 0.9)
        self.assertEqual(result["best"], result["trials"][0])
        self.assertTrue(
            os.path.exists(os.path.join(out, "tuned_student.keras"))
        )


@tiny.ONCE
class ProgressiveDistillationScriptTest(parameterized.TestCase):
    def test_every_option_described(self):
        parser = _load("progressive_distillation").build_parser()
        for action in parser._actions:
            self.assertTrue(action.help, msg=action.option_strings)

    def test_runs_on_bundled_data(self):
        out = self.create_tempdir().full_path
        result = _load("progressive_distillation").main(
            [
                "--data",
                "bundled_mnist",
                "--limit",
                "256",
                "--base-steps",
                "10",
                "--round-steps",
                "4",
                "--start-steps",
                "4",
                "--end-steps",
                "1",
                "--samples",
                "32",
                "--output-dir",
                out,
            ]
        )
        self.assertEqual(
            sorted(k for k in result if "/" in k),
            [
                "distilled/1",
                "distilled/2",
                "undistilled/1",
                "undistilled/2",
                "undistilled/4",
            ],
        )
        for key, scores in result.items():
            if "/" in key:
                self.assertTrue(np.isfinite(list(scores.values())).all())
        self.assertTrue(os.path.exists(os.path.join(out, "base.keras")))
        self.assertTrue(
            os.path.exists(os.path.join(out, "rounds", "steps-1.keras"))
        )


@tiny.IN_JAX_PASS
class LanguageModelScriptTest(parameterized.TestCase):
    def test_every_method_on_the_standard_library(self):
        script = _load("language_model")
        for action in script.build_parser()._actions:
            self.assertTrue(action.help, msg=action.option_strings)
        result = script.main(
            ["--steps", "4", "--teacher-steps", "4", "--seeds", "0"]
            + ["--length", "16", "--limit", "40000"]
            + ["--methods", ",".join(script.METHODS)]
        )
        self.assertGreater(result["train_tokens"], 30000)
        for method in script.METHODS:
            (run,) = result[method]
            # Byte-level perplexity: below uniform (256) after a few steps.
            self.assertBetween(run["perplexity"], 1.0, 256.0)
            self.assertGreater(run["tokens_per_second"], 0)
            # The training's own peak (Linux): at least what was resident
            # when it started, the student built during it.
            self.assertGreater(
                run["peak_rss_mb"], run["rss_before_training_mb"]
            )

    @pytest.mark.slow
    def test_sentence_pieces_and_the_fused_loss(self):
        # A SentencePiece vocabulary trained on the text; the fused loss
        # trains the student the unfused one does, to the same perplexity.
        script = _load("language_model")
        result = script.main(
            ["--steps", "4", "--teacher-steps", "4", "--seeds", "0"]
            + ["--length", "16", "--limit", "40000", "--vocabulary", "400"]
            + ["--methods", "kd_kl,kd_kl_fused"]
        )
        self.assertLess(result["train_tokens"], 30000)
        (unfused,), (fused,) = result["kd_kl"], result["kd_kl_fused"]
        self.assertBetween(unfused["perplexity"], 1.0, 400.0)
        self.assertAlmostEqual(
            fused["perplexity"] / unfused["perplexity"], 1.0, places=4
        )


@tiny.ONCE
class CachedTeacherScriptTest(parameterized.TestCase):
    def test_writes_caches_trains_from_them_restarts_and_refuses(self):
        script = _load("cached_teacher")
        out = self.create_tempdir().full_path
        result = script.main(
            ["--epochs", "1", "--teacher-epochs", "1", "--limit", "256"]
            + ["--output-dir", out]
        )
        for method in script.METHODS:
            self.assertBetween(result[method]["accuracy"], 0.0, 1.0)
            self.assertGreater(result[method]["seconds_per_epoch"], 0)
        sizes = {name: size for name, (_, _, size) in result["caches"].items()}
        # Dense: ten float16 log-probabilities and an int32 fingerprint a
        # sample, and each `.npy` file's header. Top-3 stores less, 8 draws
        # more.
        self.assertBetween(sizes["dense"], 24.0, 26.0)
        self.assertLess(sizes["top_k"], sizes["dense"])
        self.assertGreater(sizes["sampled"], sizes["dense"])
        self.assertTrue(result["restart_identical"])
        self.assertIn(
            "differ from those the teacher's outputs were written for",
            result["augmentation_error"],
        )
        self.assertTrue(os.path.exists(os.path.join(out, "student.keras")))


NOTEBOOKS = {
    "teacher_kd": "student.keras",
    "self_distillation": None,
    "auxiliary_exits": "block2.keras",
    "scaling_out": None,
    "language_model": "student_lm.keras",
    "progressive_distillation": "student_2_steps.keras",
    "cached_teacher": "student_cached.keras",
    "one_step": "generator_dmd2.keras",
    "compression": "student_int8.keras",
}


# The kernels run on TensorFlow (scaling_out needs tf.distribute), started
# from the JAX pass to even out the two passes' times.
@tiny.IN_JAX_PASS
class NotebooksTest(parameterized.TestCase):
    @parameterized.parameters(*NOTEBOOKS)
    def test_executes_offline_on_tiny_settings(self, name):
        notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
        self.assertIn("colab-badge.svg", notebook.cells[0].source)
        self.assertIn(f"examples/{name}.ipynb", notebook.cells[0].source)
        rendered = [
            output
            for cell in notebook.cells
            if cell.cell_type == "code"
            for output in cell.outputs
            if "image/png" in output.get("data", {})
        ]
        self.assertNotEmpty(rendered, "the notebook carries its plots")
        folder = self.create_tempdir().full_path
        saved = dict(os.environ)
        os.environ.update(KSD_QUICK="1", KERAS_BACKEND="tensorflow")
        try:
            nbclient.NotebookClient(
                notebook,
                timeout=300,
                kernel_name="python3",
                resources={"metadata": {"path": folder}},
            ).execute()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        errors = [
            output
            for cell in notebook.cells
            if cell.cell_type == "code"
            for output in cell.outputs
            if output.output_type == "error"
        ]
        self.assertEmpty(errors)
        if NOTEBOOKS[name]:
            self.assertTrue(
                os.path.exists(os.path.join(folder, NOTEBOOKS[name]))
            )
