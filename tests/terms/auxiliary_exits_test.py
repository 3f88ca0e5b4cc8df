import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _ce(labels, logits):
    p = tiny.softmax(np.float64(logits))
    return -np.log(p[np.arange(len(labels)), labels])


def _fixed_outputs(rng, n=5, classes=3, features=False):
    outputs = {
        "output": rng.normal(size=(n, classes)).astype("float32") * 2,
        "b1": rng.normal(size=(n, classes)).astype("float32") * 2,
        "b2": rng.normal(size=(n, classes)).astype("float32") * 2,
    }
    if features:
        outputs["b1_features"] = rng.normal(size=(n, 4)).astype("float32")
        outputs["b2_features"] = rng.normal(size=(n, 8)).astype("float32")
        outputs["deepest_features"] = rng.normal(size=(n, 8)).astype("float32")
    return outputs


def _attached(**kwargs):
    term = ksd.terms.AuxiliaryExits(["b1", "b2"], **kwargs)
    term.attach(tiny.cnn())
    return term


class AuxiliaryExitsLossTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.rng = np.random.default_rng(0)
        self.labels = np.array([0, 2, 1, 1, 0])

    def test_byot_loss_matches_numpy(self):
        term = _attached(temperature=2.0, xi=0.3, weight=[0.5, 2.0])
        outputs = _fixed_outputs(self.rng)
        loss = term.compute_loss(None, self.labels, outputs, None, 0, 0)
        expected = 0
        for name, w in (("b1", 0.5), ("b2", 2.0)):
            expected = expected + w * (
                0.7 * _ce(self.labels, outputs[name])
                + 0.3 * tiny.kd(outputs["output"], outputs[name], 2.0)
            )
        self.assertAlmostEqual(float(loss), expected.mean(), places=5)

    def test_feature_hint_matches_numpy(self):
        term = ksd.terms.AuxiliaryExits(
            ["b1", "b3"], xi=0.0, feature_weight=0.25
        )
        term.attach(tiny.cnn())
        base = _fixed_outputs(self.rng, features=True)
        outputs = {
            "output": base["output"],
            "b1": base["b1"],
            "b3": base["b2"],
            "b1_features": base["b1_features"],
            "b3_features": base["b2_features"],
            "deepest_features": base["deepest_features"],
        }
        # b1 (width 4) goes through a learnable projection to the deepest
        # width 8; b3 already has width 8 and is compared directly.
        projection = term.projections[0].kernel.numpy()
        self.assertEqual(projection.shape, (4, 8))
        self.assertIsInstance(term.projections[1], keras.layers.Identity)
        loss = term.compute_loss(None, self.labels, outputs, None, 0, 0)
        deepest = outputs["deepest_features"]
        hint_b1 = np.mean(
            np.square(outputs["b1_features"] @ projection - deepest), axis=-1
        )
        hint_b3 = np.mean(np.square(outputs["b3_features"] - deepest), axis=-1)
        expected = (
            _ce(self.labels, outputs["b1"])
            + 0.25 * hint_b1
            + _ce(self.labels, outputs["b3"])
            + 0.25 * hint_b3
        )
        self.assertAlmostEqual(float(loss), expected.mean(), places=5)

    def test_one_hot_labels_and_sample_weight(self):
        term = _attached(xi=0.5)
        outputs = _fixed_outputs(self.rng)
        one_hot = np.eye(3, dtype="float32")[self.labels]
        weights = np.array([1.0, 0.0, 2.0, 1.0, 0.5], "float32")
        sparse = term.compute_loss(None, self.labels, outputs, weights, 0, 0)
        dense = term.compute_loss(None, one_hot, outputs, weights, 0, 0)
        per_sample = sum(
            0.5 * _ce(self.labels, outputs[n])
            + 0.5 * tiny.kd(outputs["output"], outputs[n], 3.0)
            for n in ("b1", "b2")
        )
        expected = np.sum(per_sample * weights) / len(weights)
        self.assertAlmostEqual(float(sparse), expected, places=5)
        self.assertAlmostEqual(float(dense), expected, places=5)

    def test_label_free_exits_learn_from_the_output_only(self):
        term = _attached(xi=0.2, temperature=1.5)
        outputs = _fixed_outputs(self.rng)
        loss = term.compute_loss(None, None, outputs, None, 0, 0)
        expected = sum(
            tiny.kd(outputs["output"], outputs[n], 1.5) for n in ("b1", "b2")
        )
        self.assertAlmostEqual(float(loss), expected.mean(), places=5)

    def test_shallow_to_deep_matches_numpy(self):
        term = _attached(xi=0.4, temperature=2.0, direction="shallow_to_deep")
        outputs = _fixed_outputs(self.rng)
        loss = term.compute_loss(None, self.labels, outputs, None, 0, 0)
        mixture = (
            tiny.softmax(np.float64(outputs["b1"]) / 2.0)
            + tiny.softmax(np.float64(outputs["b2"]) / 2.0)
        ) / 2
        q = tiny.softmax(np.float64(outputs["output"]) / 2.0)
        kd = 4.0 * np.sum(mixture * (np.log(mixture) - np.log(q)), axis=-1)
        expected = (
            _ce(self.labels, outputs["b1"])
            + _ce(self.labels, outputs["b2"])
            + 0.4 * kd
        )
        self.assertAlmostEqual(float(loss), expected.mean(), places=5)


class BYOTObjectiveTest(parameterized.TestCase):
    @parameterized.named_parameters(("default", False), ("paper", True))
    def test_final_label_weight(self, scale_final_label):
        # Zero learning rate and one full batch: the logged loss is the
        # objective at the initial weights. BYOT's objective weighs the
        # final head's cross-entropy 1 − α; ours 1 by default.
        x, y = tiny.images(n=12)
        student = tiny.cnn()
        distiller = ksd.Distiller(
            student,
            [
                ksd.terms.AuxiliaryExits(
                    ["b1", "b2"],
                    xi=0.3,
                    scale_final_label=scale_final_label,
                )
            ],
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        history = distiller.fit(x, y, batch_size=12, verbose=0).history
        outputs = distiller.exits(x)
        final_ce = _ce(y, outputs["output"]).mean()
        expected = sum(
            0.7 * _ce(y, outputs[name])
            + 0.3 * tiny.kd(outputs["output"], outputs[name], 3.0)
            for name in ("b1", "b2")
        ).mean()
        self.assertAlmostEqual(
            history["auxiliary_exits_loss"][0], expected, places=4
        )
        scale = 0.7 if scale_final_label else 1.0
        self.assertAlmostEqual(
            history["loss"][0], scale * final_ce + expected, places=4
        )

    def test_rejects_paper_objective_in_reverse_direction(self):
        with self.assertRaisesRegex(ValueError, "shallow_to_deep"):
            ksd.terms.AuxiliaryExits(
                ["b1"], direction="shallow_to_deep", scale_final_label=True
            )
        with self.assertRaisesRegex(TypeError, "scale_final_label=1"):
            ksd.terms.AuxiliaryExits(["b1"], scale_final_label=1)


class AuxiliaryExitsGradientTest(parameterized.TestCase):
    def test_kd_does_not_reach_the_deepest_exit(self):
        term = _attached(xi=1.0, direction="deep_to_shallow")
        outputs = _fixed_outputs(np.random.default_rng(1))
        grads = tiny.gradients(
            lambda o: term.compute_loss(None, None, o, None, 0, 0), outputs
        )
        np.testing.assert_array_equal(grads["output"], 0.0)
        for name in ("b1", "b2"):
            self.assertGreater(np.abs(grads[name]).max(), 0)

    def test_reverse_direction_does_not_reach_the_exits(self):
        term = _attached(xi=1.0, direction="shallow_to_deep")
        outputs = _fixed_outputs(np.random.default_rng(1))
        labels = np.array([0, 1, 2, 0, 1])
        total = tiny.gradients(
            lambda o: term.compute_loss(None, labels, o, None, 0, 0), outputs
        )
        supervised = tiny.gradients(
            lambda o: sum(
                keras.ops.mean(
                    keras.losses.sparse_categorical_crossentropy(
                        labels, o[n], from_logits=True
                    )
                )
                for n in ("b1", "b2")
            ),
            outputs,
        )
        for name in ("b1", "b2"):
            # The exits' gradient is their label loss alone: the teaching
            # part is detached on their side.
            np.testing.assert_allclose(
                total[name], supervised[name], rtol=1e-5, atol=1e-7
            )
        self.assertGreater(np.abs(total["output"]).max(), 0)


class AuxiliaryExitsConfigTest(parameterized.TestCase):
    def test_errors(self):
        with self.assertRaisesRegex(TypeError, "list of layer names"):
            ksd.terms.AuxiliaryExits("b1")
        with self.assertRaisesRegex(ValueError, "empty"):
            ksd.terms.AuxiliaryExits([])
        with self.assertRaisesRegex(ValueError, "one weight per exit"):
            ksd.terms.AuxiliaryExits(["b1", "b2"], weight=[1.0])
        with self.assertRaisesRegex(ValueError, "direction"):
            ksd.terms.AuxiliaryExits(["b1"], direction="sideways")
        with self.assertRaisesRegex(ValueError, r"alpha.*\[0, 1\]"):
            ksd.terms.AuxiliaryExits(["b1"], xi=1.5)
        with self.assertRaisesRegex(ValueError, "temperature"):
            ksd.terms.AuxiliaryExits(["b1"], temperature=0.0)
        with self.assertRaisesRegex(ValueError, "head="):
            ksd.terms.AuxiliaryExits(["b1"], head="huge")
        with self.assertRaisesRegex(ValueError, r"no layer named \['b7'\]"):
            ksd.Distiller(tiny.cnn(), [ksd.terms.AuxiliaryExits(["b7"])])
        other = ksd.exits.attach_exits(tiny.cnn(), ["b1"])
        with self.assertRaisesRegex(ValueError, "not to the distiller"):
            ksd.Distiller(tiny.cnn(), [ksd.terms.AuxiliaryExits(other)])
        student = tiny.cnn()
        plain = ksd.exits.attach_exits(student, ["b1"])
        with self.assertRaisesRegex(ValueError, "features=True"):
            ksd.Distiller(
                student,
                [ksd.terms.AuxiliaryExits(plain, feature_weight=0.1)],
            )
        term = _attached()
        with self.assertRaisesRegex(ValueError, "needs the exits' outputs"):
            term.compute_loss(None, None, np.zeros((2, 3)), None, 0, 0)
        with self.assertRaisesRegex(ValueError, "without feature hints"):
            term.feature_weight = 0.5

    def test_hyperparameters_can_change_between_steps(self):
        term = _attached(xi=0.5)
        term.xi = 0.0
        term.temperature = 5.0
        self.assertEqual(term.xi, 0.0)
        self.assertEqual(term.temperature, 5.0)

    def test_alpha_is_the_deprecated_name_of_xi(self):
        with self.assertWarnsRegex(DeprecationWarning, "pass `xi=...`"):
            term = ksd.terms.AuxiliaryExits(["b1"], alpha=0.25)
        self.assertEqual(term.xi, 0.25)
        with self.assertWarnsRegex(DeprecationWarning, "use `xi`"):
            self.assertEqual(term.alpha, 0.25)
        with self.assertWarnsRegex(DeprecationWarning, "use `xi`"):
            term.alpha = 0.5
        self.assertEqual(term.xi, 0.5)
        # A configuration of release 0.1.0 says `alpha`, and loads silently.
        config = dict(term.get_config())
        config["alpha"] = config.pop("xi")
        self.assertEqual(ksd.terms.AuxiliaryExits.from_config(config).xi, 0.5)

    def test_config_round_trip(self):
        term = ksd.terms.AuxiliaryExits(
            ["b1", "b2"],
            weight=[0.2, ksd.schedules.LinearRampUp(ramp_up_epochs=3)],
            xi=ksd.schedules.SigmoidRampUp(ramp_up_steps=10),
            head="bottleneck",
        )
        clone = ksd.terms.AuxiliaryExits.from_config(term.get_config())
        self.assertEqual(clone.exit_names, ["b1", "b2"])
        self.assertEqual(clone.head, "bottleneck")
        self.assertIsInstance(clone.xi, ksd.schedules.SigmoidRampUp)
        self.assertFalse(clone.scale_final_label)
        paper = ksd.terms.AuxiliaryExits(["b1"], scale_final_label=True)
        self.assertTrue(
            ksd.terms.AuxiliaryExits.from_config(
                paper.get_config()
            ).scale_final_label
        )
        factory_term = ksd.terms.AuxiliaryExits(
            ["b1"], head=lambda n, s, c: keras.layers.Dense(c)
        )
        with self.assertRaisesRegex(TypeError, "custom heads"):
            factory_term.get_config()
