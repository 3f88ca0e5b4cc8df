"""`.keras` files of every configuration, and of terms sharing a teacher."""

import os

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import distributed_run
from tests import tiny


def _values(distiller):
    return [keras.ops.convert_to_numpy(v) for v in distiller.variables] + [
        keras.ops.convert_to_numpy(v) for v in distiller.optimizer.variables
    ]


def _round_trip(test, distiller):
    path = os.path.join(test.create_tempdir().full_path, "distiller.keras")
    distiller.save(path)
    restored = keras.saving.load_model(path)
    for a, b in zip(_values(distiller), _values(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    return restored


def _sharing(distiller):
    """For each teacher and teacher model of the terms, in order, where it
    first occurs: equal lists, equal sharing."""
    objects = []
    for term in distiller.terms:
        for teacher in term.teachers:
            for leaf in teacher.walk():
                objects.append(leaf)
                objects.extend(leaf.feature_models())
    return [
        next(i for i, seen in enumerate(objects) if seen is o) for o in objects
    ]


# Every configuration of the parity harness: the slow tier.
@pytest.mark.slow
class ConfigurationFileTest(parameterized.TestCase):
    @parameterized.parameters(*distributed_run.KINDS)
    def test_every_configuration_saves_loads_and_trains_on(self, kind):
        distiller = distributed_run.distiller(keras, ksd, kind)
        data = distributed_run.data(ksd, kind)
        distiller.fit(data.take(2), epochs=1, verbose=0)
        restored = _round_trip(self, distiller)
        self.assertEqual(_sharing(restored), _sharing(distiller))
        for model in (distiller, restored):
            model.fit(data.take(2), epochs=1, verbose=0)
        for a, b in zip(_values(distiller), _values(restored), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _shared(kind, test):
    """Two terms of one distiller reading one teacher (or one model)."""
    model = tiny.cnn(seed=1)
    if kind == "model":
        # The README's FitNets stage: logits and features of one model.
        return [
            ksd.terms.Distillation(model, temperature=2.0),
            ksd.terms.FeatureDistillation(model, "b2"),
        ]
    if kind == "ensemble_member":
        return [
            ksd.terms.Distillation(
                ksd.teachers.Ensemble([model, tiny.cnn(seed=3)])
            ),
            ksd.terms.FeatureDistillation(model, "b2"),
        ]
    if kind == "cached":
        directory = test.create_tempdir().full_path
        ksd.cache.write_teacher_outputs(
            model,
            ksd.data.with_sample_ids(tiny.images(16)[0]),
            directory,
            num_samples=16,
            verbose=0,
        )
        teacher = ksd.teachers.Cached(directory)
        return [
            ksd.terms.Distillation(teacher),
            ksd.terms.Distillation(teacher, loss="reverse_kl", name="rkl"),
        ]
    teacher = {
        "frozen_model": lambda: ksd.teachers.FrozenModel(model),
        "ema": lambda: ksd.teachers.EMA(momentum=0.5),
        "snapshot": lambda: ksd.teachers.Snapshot(keep=2),
        "random_init": ksd.teachers.RandomInit,
    }[kind]()
    return [
        ksd.terms.Distillation(teacher, temperature=2.0),
        ksd.terms.FeatureDistillation(teacher, "b2"),
    ]


def _round_trip_shared(test, kind):
    x, y = tiny.images(16)
    inputs = ksd.data.with_sample_ids(x) if kind == "cached" else x
    distiller = ksd.Distiller(tiny.cnn(seed=2), _shared(kind, test))
    distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
    distiller.fit(inputs, y, batch_size=8, epochs=2, verbose=0)
    restored = _round_trip(test, distiller)
    # One teacher (or model) in the file as in the distiller.
    sharing = _sharing(distiller)
    test.assertEqual(_sharing(restored), sharing)
    test.assertNotEqual(sharing, list(range(len(sharing))))
    for model in (distiller, restored):
        model.fit(inputs, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(_values(distiller), _values(restored), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


class SharedTeacherTest(parameterized.TestCase):
    def test_terms_sharing_a_model_round_trip(self):
        # The README's FitNets stage: logits and features of one model.
        _round_trip_shared(self, "model")

    def test_a_shared_teacher_updates_once_per_step(self):
        # Two terms reading one EMA: one average per step, as with one term.
        x, y = tiny.images(16)
        averages = []
        for terms in (
            lambda t: [ksd.terms.Distillation(t)],
            lambda t: [
                ksd.terms.Distillation(t),
                ksd.terms.FeatureDistillation(t, "b2", weight=0.0),
            ],
        ):
            teacher = ksd.teachers.EMA(momentum=0.5)
            distiller = ksd.Distiller(tiny.cnn(seed=2), terms(teacher))
            distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
            distiller.fit(
                x, y, batch_size=8, epochs=1, shuffle=False, verbose=0
            )
            self.assertEqual(
                int(keras.ops.convert_to_numpy(teacher.updates)), 2
            )
            averages.append(teacher.model.get_weights())
        for a, b in zip(*averages, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def test_a_prediction_bank_read_by_two_terms_is_refused(self):
        bank = ksd.teachers.PastPredictions(16, tiny.NUM_CLASSES)
        with self.assertRaisesRegex(ValueError, "only one term may read it"):
            ksd.Distiller(
                tiny.mlp(),
                [
                    ksd.terms.Distillation(bank),
                    ksd.terms.Distillation(
                        ksd.teachers.Ensemble([bank, tiny.mlp(seed=1)]),
                        name="ensemble",
                    ),
                ],
            )


# Every other shared teacher: the slow tier.
@pytest.mark.slow
class SharedTeacherSlowTest(parameterized.TestCase):
    @parameterized.parameters(
        "frozen_model",
        "ensemble_member",
        "ema",
        "snapshot",
        "random_init",
        "cached",
    )
    def test_terms_sharing_a_teacher_round_trip(self, kind):
        _round_trip_shared(self, kind)
