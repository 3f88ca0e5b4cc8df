import os
import warnings

import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


class EnsembleTest(parameterized.TestCase):
    def setUp(self):
        self.x, _ = tiny.data(n=6)
        self.models = [tiny.mlp(name=f"t{i}", seed=i) for i in range(3)]
        self.logits = [m.predict(self.x, verbose=0) for m in self.models]

    def test_config(self):
        ensemble = ksd.teachers.Ensemble(
            self.models, weights=[1, 2, 3], drop_rate=0.5, seed=4
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(ensemble)
        )
        self.assertIsInstance(restored, ksd.teachers.Ensemble)
        self.assertEqual(restored.teacher_weights, [1.0, 2.0, 3.0])
        self.assertEqual(restored.drop_rate, 0.5)
        self.assertEqual(len(restored.members), 3)

    def test_teachers_is_the_deprecated_name_of_members(self):
        with self.assertWarnsRegex(DeprecationWarning, "members=..."):
            ensemble = ksd.teachers.Ensemble(teachers=self.models)
        with self.assertWarnsRegex(DeprecationWarning, "Ensemble.members"):
            self.assertIs(ensemble.teachers, ensemble.members)
        with self.assertRaisesRegex(TypeError, "once, as `members`"):
            ksd.teachers.Ensemble(self.models, teachers=self.models)
        # Saving and loading read the alias without a warning; the file
        # holds the members under their new name.
        distiller = ksd.Distiller(
            tiny.mlp(), [ksd.terms.Distillation(ensemble)]
        )
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "error", "`Ensemble.teachers`", DeprecationWarning
            )
            distiller.save(path)
            restored = keras.saving.load_model(path)
        self.assertEqual(
            restored.get_config()["terms"][0]["config"]["teacher"]["config"][
                "members"
            ][0]["class_name"],
            "FrozenModel",
        )
        np.testing.assert_array_equal(
            restored.terms[0].teacher.members[0].model.get_weights()[0],
            self.models[0].get_weights()[0],
        )

    def test_mixes_tempered_probabilities(self):
        ensemble = ksd.teachers.Ensemble(self.models, weights=[1, 1, 2])
        targets = keras.ops.convert_to_numpy(
            ensemble.targets(self.x, None, 2.0)
        )
        # The mixture's log-probabilities at T, not divided again:
        # exp(targets) = Σ_i w_i softmax(z_i / T) / Σ_i w_i.
        self.assertEqual(ensemble.target_kind, "log_probs")
        expected = (
            sum(
                w * tiny.softmax(z / 2.0)
                for w, z in zip([1, 1, 2], self.logits)
            )
            / 4.0
        )
        np.testing.assert_allclose(
            np.exp(targets), expected, rtol=1e-5, atol=1e-7
        )

    def test_dropping_keeps_at_least_one_teacher(self):
        ensemble = ksd.teachers.Ensemble(self.models, drop_rate=0.99, seed=1)
        singles = [tiny.softmax(z) for z in self.logits]
        seen = set()
        for _ in range(12):
            probs = tiny.softmax(
                keras.ops.convert_to_numpy(ensemble.targets(self.x, None, 1.0))
            )
            matches = [
                i
                for i, p in enumerate(singles)
                if np.allclose(p, probs, atol=1e-5)
            ]
            self.assertLen(matches, 1)
            seen.add(matches[0])
        self.assertGreater(len(seen), 1)

    def test_accepts_teachers_and_rejects_bad_arguments(self):
        ensemble = ksd.teachers.Ensemble(
            [ksd.teachers.FrozenModel(self.models[0]), self.models[1]]
        )
        self.assertIsInstance(ensemble.members[1], ksd.teachers.FrozenModel)
        with self.assertRaisesRegex(ValueError, "non-empty list"):
            ksd.teachers.Ensemble([])
        with self.assertRaisesRegex(ValueError, "weights=\\[1, -1\\]"):
            ksd.teachers.Ensemble(self.models[:2], weights=[1, -1])
        with self.assertRaisesRegex(ValueError, "drop_rate=1.0"):
            ksd.teachers.Ensemble(self.models, drop_rate=1.0)
        with self.assertRaisesRegex(TypeError, "Received: teacher="):
            ksd.teachers.Ensemble(["resnet"])

    def test_trains_inside_distiller(self):
        x, y = tiny.data(n=16)
        distiller = ksd.Distiller(
            tiny.mlp(name="student", seed=9),
            [
                ksd.terms.Distillation(
                    ksd.teachers.Ensemble(self.models, drop_rate=0.3, seed=0),
                    temperature=2.0,
                )
            ],
        )
        distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
        history = distiller.fit(x, y, epochs=2, verbose=0)
        self.assertTrue(np.isfinite(history.history["distillation_loss"]).all())

    def test_seed_state_is_saved(self):
        # A run resumed from a backup continues the stream of dropped
        # members instead of drawing the first epochs' again.
        def build():
            distiller = ksd.Distiller(
                tiny.mlp(name="student", seed=9),
                [
                    ksd.terms.Distillation(
                        ksd.teachers.Ensemble(
                            [tiny.mlp(name=f"m{i}", seed=i) for i in range(2)],
                            drop_rate=0.3,
                            seed=0,
                        )
                    )
                ],
            )
            distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
            return distiller

        distiller = build()
        distiller.fit(*tiny.data(n=16), epochs=1, verbose=0)
        state = distiller.terms[0].teacher.seed_generator.state
        path = self.create_tempdir().full_path + "/d.weights.h5"
        distiller.save_weights(path)
        restored = build()
        restored.load_weights(path)
        np.testing.assert_array_equal(
            restored.terms[0].teacher.seed_generator.state, state
        )
        self.assertGreater(int(keras.ops.convert_to_numpy(state)[1]), 0)
