import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


class _RecordEpochEnds(keras.callbacks.Callback):
    def __init__(self, student):
        super().__init__()
        self.student = student
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.student.get_weights())


class SnapshotTest(parameterized.TestCase):
    def test_config(self):
        teacher = ksd.teachers.Snapshot(freq=2, keep=3, combine="vote")
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(teacher)
        )
        self.assertEqual(
            (restored.freq, restored.keep, restored.combine), (2, 3, "vote")
        )

    def test_refresh_timing_and_rotation(self):
        x, y = tiny.data(n=8)
        student = tiny.mlp(seed=2)
        teacher = ksd.teachers.Snapshot(freq=2, keep=2)
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=tiny.sparse_ce()
        )
        recorder = _RecordEpochEnds(student)
        distiller.fit(
            x, y, batch_size=4, epochs=7, verbose=0, callbacks=[recorder]
        )
        # Snapshots after epochs 2, 4, 6 (1-based) into slots 0, 1, 0.
        self.assertEqual(int(teacher.taken.numpy()), 3)
        for a, b in zip(teacher.models[0].get_weights(), recorder.weights[5]):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(teacher.models[1].get_weights(), recorder.weights[3]):
            np.testing.assert_array_equal(a, b)

    def test_fit_in_a_loop_keeps_the_period(self):
        # One `fit(epochs=1)` per epoch: the distiller counts the epochs, so
        # freq=2 still snapshots after every second one.
        x, y = tiny.data(n=8)
        teacher = ksd.teachers.Snapshot(freq=2)
        distiller = ksd.Distiller(
            tiny.mlp(seed=2), [ksd.terms.Distillation(teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        for _ in range(5):
            distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
        self.assertEqual(int(keras.ops.convert_to_numpy(teacher.taken)), 2)

    def test_labels_keep_full_weight_before_the_first_snapshot(self):
        # No snapshot yet: ξ does not scale the labels, so the run equals
        # plain cross-entropy weight for weight.
        x, y = tiny.data(n=8)
        runs = []
        for terms in (
            [ksd.terms.Distillation(ksd.teachers.Snapshot(freq=5), xi=0.7)],
            [],
        ):
            student = tiny.mlp(seed=2)
            distiller = ksd.Distiller(student, terms)
            distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
            distiller.fit(x, y, batch_size=4, shuffle=False, verbose=0)
            runs.append(student.get_weights())
        for a, b in zip(*runs):
            np.testing.assert_allclose(a, b, atol=1e-6)

    def test_no_snapshot_means_no_loss(self):
        x, y = tiny.data(n=8)
        teacher = ksd.teachers.Snapshot(freq=5)
        distiller = ksd.Distiller(
            tiny.mlp(seed=2), [ksd.terms.Distillation(teacher)]
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=tiny.sparse_ce()
        )
        history = distiller.fit(x, y, batch_size=4, epochs=2, verbose=0)
        np.testing.assert_allclose(
            history.history["distillation_loss"], [0.0, 0.0], atol=1e-6
        )

    @parameterized.named_parameters(("average", "average"), ("vote", "vote"))
    def test_combines_snapshots(self, combine):
        x, _ = tiny.data(n=6)
        student = tiny.mlp(seed=2)
        teacher = ksd.teachers.Snapshot(keep=3, combine=combine)
        teacher.attach(student)
        weights = [tiny.mlp(seed=s).get_weights() for s in (3, 4)]
        for w in weights:
            student.set_weights(w)
            teacher.on_epoch_end(0)
        student.set_weights(tiny.mlp(seed=9).get_weights())
        logits = [tiny.mlp(seed=s).predict(x, verbose=0) for s in (3, 4)]
        # Log-probabilities at T (each class 1e-6 more, renormalised).
        self.assertEqual(teacher.target_kind, "log_probs")
        got = np.exp(np.asarray(teacher.targets(x, np.zeros((6, 3)), 2.0)))
        if combine == "average":
            # Mean of the two tempered distributions; slot 3 is empty.
            expected = tiny.softmax(logits[0] / 2) + tiny.softmax(logits[1] / 2)
            expected /= 2
        else:
            # Fraction of the two snapshots voting for each class.
            expected = sum(np.eye(3)[z.argmax(-1)] for z in logits) / 2
        np.testing.assert_allclose(got, expected, atol=1e-5)

    def test_rejects_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "freq=0"):
            ksd.teachers.Snapshot(freq=0)
        with self.assertRaisesRegex(ValueError, "combine='max'"):
            ksd.teachers.Snapshot(combine="max")
        with self.assertRaisesRegex(TypeError, "keep=2.0"):
            ksd.teachers.Snapshot(keep=2.0)
