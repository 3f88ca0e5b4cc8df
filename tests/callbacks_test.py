"""`StudentCheckpoint`, and TensorBoard's histograms of a distiller."""

import glob
import inspect
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _distiller():
    teacher = tiny.cnn(seed=1)
    distiller = ksd.Distiller(
        tiny.cnn(seed=2),
        [
            ksd.terms.Distillation(teacher, temperature=2.0),
            ksd.terms.FeatureDistillation(teacher, "b2"),
        ],
    )
    distiller.compile("adam", tiny.sparse_ce(), metrics=["accuracy"])
    return distiller


class StudentCheckpointTest(parameterized.TestCase):
    def test_saves_the_student_alone_as_model_checkpoint_does(self):
        x, y = tiny.images(16)
        folder = self.create_tempdir().full_path
        best = ksd.callbacks.StudentCheckpoint(
            os.path.join(folder, "best.keras"),
            monitor="loss",
            save_best_only=True,
        )
        every = ksd.callbacks.StudentCheckpoint(
            os.path.join(folder, "epoch-{epoch}.weights.h5"),
            save_weights_only=True,
        )
        distiller = _distiller()
        history = distiller.fit(
            x, y, batch_size=8, epochs=3, callbacks=[best, every], verbose=0
        )
        # A plain Keras model, loaded without the library's classes.
        student = keras.saving.load_model(
            os.path.join(folder, "best.keras"), safe_mode=True
        )
        self.assertLen(student.weights, len(distiller.student.weights))
        losses = history.history["loss"]
        if losses[-1] == min(losses):
            for a, b in zip(
                student.get_weights(), distiller.student.get_weights()
            ):
                np.testing.assert_array_equal(a, b)
        self.assertLen(glob.glob(os.path.join(folder, "epoch-*.weights.h5")), 3)
        last = tiny.cnn(seed=5)
        last.load_weights(os.path.join(folder, "epoch-3.weights.h5"))
        for a, b in zip(last.get_weights(), distiller.student.get_weights()):
            np.testing.assert_array_equal(a, b)


class TensorBoardHistogramTest(parameterized.TestCase):
    # TensorBoard's writer is TensorFlow's on both backends: once.
    @tiny.ONCE
    def test_histograms_are_the_trained_weights_not_the_teachers(self):
        x, y = tiny.images(16)
        folder = self.create_tempdir().full_path
        board = keras.callbacks.TensorBoard(folder, histogram_freq=1)
        distiller = _distiller()
        distiller.fit(
            x, y, batch_size=8, epochs=2, callbacks=[board], verbose=0
        )
        drawn = []
        for path in glob.glob(os.path.join(folder, "train", "events.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                drawn.extend(
                    (event.step, value.tag)
                    for value in event.summary.value
                    if value.tag.endswith("/histogram")
                )
        # Keras tags a histogram with the weight's path, or before 3.13
        # with its name ("kernel", which the teacher's share).
        by_path = "weight.path" in inspect.getsource(
            keras.callbacks.TensorBoard._log_weights
        )
        expected = sorted(
            f"{weight.path if by_path else weight.name}/histogram"
            for weight in distiller.trained_weights
        )
        # Per epoch: the student's 8 weights and the FitNets projector's 2,
        # once each; the frozen teacher's (the same layer names) never.
        self.assertLen(expected, 10)
        for epoch in (0, 1):
            tags = [tag for step, tag in drawn if step == epoch]
            self.assertEqual(sorted(tags), expected)
        if by_path:
            self.assertLen([t for t in expected if "projector" in t], 2)
