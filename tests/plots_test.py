import keras
import numpy as np
import pytest
from absl.testing import parameterized
from matplotlib.figure import Figure

import keras_selfdistill as ksd
from keras_selfdistill import demo


def _lines(axes):
    return {line.get_label(): line.get_ydata() for line in axes.lines}


class HistoryTest(parameterized.TestCase):
    def test_each_quantity_beside_what_it_compares_with(self):
        logs = {
            "loss": [1.0, 0.5],
            "supervised_loss": [0.6, 0.3],
            "distillation_loss": [0.4, 0.2],
            "accuracy": [0.5, 0.8],
            "distillation_weight": [50.0, 100.0],
            "val_loss": [1.1, 0.7],
            "val_accuracy": [0.4, 0.7],
        }
        figure = ksd.plots.history(logs)
        self.assertIsInstance(figure, Figure)
        self.assertEqual(figure._repr_png_()[:4], b"\x89PNG")
        objective, validation, metrics, schedules = figure.axes
        # The mixed objective apart from the student's validation loss, a
        # weight of 100 apart from the accuracies.
        self.assertEqual(
            [a.get_title() for a in figure.axes],
            ["Training objective", "Validation loss", "Metrics", "Schedules"],
        )
        self.assertEqual(
            set(_lines(objective)),
            {"loss", "supervised_loss", "distillation_loss"},
        )
        self.assertEqual(set(_lines(validation)), {"val_loss"})
        self.assertEqual(set(_lines(metrics)), {"accuracy", "val_accuracy"})
        np.testing.assert_array_equal(
            _lines(schedules)["distillation_weight"], [50.0, 100.0]
        )
        np.testing.assert_array_equal(objective.lines[0].get_xdata(), [1, 2])
        # A validation curve has its training curve's colour, dashed.
        train, val = metrics.lines
        self.assertEqual(train.get_color(), val.get_color())
        self.assertEqual(
            (train.get_linestyle(), val.get_linestyle()), ("-", "--")
        )
        loss, *_ = objective.lines
        self.assertEqual(loss.get_color(), validation.lines[0].get_color())
        chosen = ksd.plots.history(logs, hyperparameters=[])
        self.assertEqual([a.get_title() for a in chosen.axes][-1], "Metrics")

    def test_schedules_named_by_the_distiller(self):
        x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
        y = np.arange(16) % 3
        student = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3, name="out")]
        )
        teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        distiller = ksd.Distiller(
            student,
            [
                ksd.terms.Distillation(
                    teacher,
                    xi=ksd.schedules.LinearRampUp(ramp_up_epochs=2, end=0.5),
                )
            ],
        )
        distiller.compile(
            "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        fit = distiller.fit(x, y, epochs=2, verbose=0)
        self.assertEqual(distiller.schedule_names, ["distillation_xi"])
        figure = ksd.plots.history(fit)
        self.assertEqual(list(_lines(figure.axes[-1])), ["distillation_xi"])

    def test_without_matplotlib_says_how_to_install_it(self):
        import sys
        from unittest import mock

        with mock.patch.dict(sys.modules, {"matplotlib.figure": None}):
            with self.assertRaisesRegex(ImportError, r"\[plots\]"):
                ksd.plots.history({"loss": [1.0]})

    def test_rejects_what_is_not_a_history(self):
        with self.assertRaisesRegex(TypeError, "History"):
            ksd.plots.history([1, 2])
        with self.assertRaisesRegex(ValueError, "not in the history"):
            ksd.plots.history({"loss": [1.0]}, hyperparameters=["xi"])


class ReliabilityDiagramTest(parameterized.TestCase):
    def test_bars_are_each_bins_accuracy(self):
        metric = ksd.metrics.ExpectedCalibrationError(
            num_bins=4, from_logits=False
        )
        # Confidences 0.9, 0.9, 0.6 (bins 3, 3, 2); hits 1, 0, 1.
        probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]], "float32")
        metric.update_state(np.array([0, 1, 1]), probs)
        bins = metric.bins()
        np.testing.assert_array_equal(bins["counts"], [0, 0, 1, 2])
        np.testing.assert_allclose(bins["accuracy"][2:], [1.0, 0.5])
        np.testing.assert_allclose(bins["confidence"][2:], [0.6, 0.9])
        self.assertTrue(np.isnan(bins["accuracy"][:2]).all())
        figure = ksd.plots.reliability_diagram(metric)
        heights = [patch.get_height() for patch in figure.axes[0].patches]
        np.testing.assert_allclose(heights, [0.0, 0.0, 1.0, 0.5])
        # ECE = (|1 − 0.6|·1 + |0.5 − 0.9|·2) / 3 = 0.4.
        self.assertEqual(figure.axes[0].get_title(), "ECE 40.00%")
        # Each bar's sample count; a title keeps the ECE.
        counts = [text.get_text() for text in figure.axes[0].texts]
        self.assertEqual(counts, ["1", "2"])
        titled = ksd.plots.reliability_diagram(metric, title="student")
        self.assertEqual(titled.axes[0].get_title(), "student (ECE 40.00%)")

    def test_rejects_an_empty_metric_or_another_kind(self):
        with self.assertRaisesRegex(ValueError, "no samples"):
            ksd.plots.reliability_diagram(
                ksd.metrics.ExpectedCalibrationError()
            )
        with self.assertRaisesRegex(TypeError, "ExpectedCalibrationError"):
            ksd.plots.reliability_diagram(keras.metrics.Accuracy())


class ExitAccuracyTest(parameterized.TestCase):
    def test_bars_in_depth_order(self):
        results = {
            "loss": 0.3,
            "accuracy": 0.9,
            "block1_accuracy": 0.6,
            "block2_accuracy": 0.8,
        }
        figure = ksd.plots.exit_accuracy(results)
        axes = figure.axes[0]
        heights = [patch.get_height() for patch in axes.patches]
        np.testing.assert_allclose(heights, [60.0, 80.0, 90.0])
        labels = [tick.get_text() for tick in axes.get_xticklabels()]
        self.assertEqual(labels, ["block1", "block2", "output"])

    def test_rejects_results_without_exits(self):
        with self.assertRaisesRegex(ValueError, "No accuracy for exits"):
            ksd.plots.exit_accuracy({"accuracy": 0.9})
        with self.assertRaisesRegex(ValueError, "accuracy"):
            ksd.plots.exit_accuracy({"block1_accuracy": 0.9})


# The slow tier: the fast tier's CPU budget.
@pytest.mark.slow
class EarlyExitTradeoffTest(parameterized.TestCase):
    def test_table_and_plot_from_a_trained_student(self):
        (x, y), (x_test, y_test) = ksd.datasets.load_mnist()
        student = demo.blocks_model()
        distiller = ksd.Distiller(
            student, [ksd.terms.AuxiliaryExits(["block1", "block2"])]
        )
        distiller.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        distiller.fit(x[:512], y[:512], epochs=1, batch_size=64, verbose=0)
        table = ksd.exits.early_exit_tradeoff(
            distiller.exits,
            x_test[:200],
            y_test[:200],
            thresholds=(0.0001, 1.0),
            batch_size=100,
            repeats=1,
        )
        self.assertEqual([row["threshold"] for row in table], [None, 1e-4, 1.0])
        full = np.argmax(student.predict(x_test[:200], verbose=0), -1)
        self.assertAlmostEqual(
            table[0]["accuracy"], np.mean(full == y_test[:200])
        )
        # Any confidence passes 1e-4: every sample leaves at the first exit.
        self.assertEqual(table[1]["mean_depth"], 0.0)
        self.assertEqual(table[1]["exit_counts"], [200, 0, 0])
        self.assertEqual(table[0]["mean_depth"], 2.0)
        self.assertGreater(table[0]["latency"], 0.0)
        figure = ksd.plots.early_exit_tradeoff(table)
        by_depth = figure.axes[0]
        np.testing.assert_allclose(
            by_depth.lines[0].get_xdata(),
            [table[1]["mean_depth"], table[2]["mean_depth"]],
        )
        np.testing.assert_allclose(
            by_depth.lines[1].get_ydata(), [table[0]["accuracy"] * 100]
        )

    def test_rejects_bad_rows_and_arguments(self):
        with self.assertRaisesRegex(ValueError, "early_exit_tradeoff"):
            ksd.plots.early_exit_tradeoff([{"threshold": 0.5}])
        exits = ksd.exits.attach_exits(demo.blocks_model(), ["block1"])
        with self.assertRaisesRegex(ValueError, "repeats"):
            ksd.exits.early_exit_tradeoff(
                exits, np.zeros((2, 28, 28, 1)), [0, 1], repeats=0
            )
        with self.assertRaisesRegex(ValueError, "as many samples"):
            ksd.exits.early_exit_tradeoff(
                exits, np.zeros((2, 28, 28, 1)), [0, 1, 2]
            )
