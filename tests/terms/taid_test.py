import math
import os

import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _official(student_logits, teacher_logits, weights, total_steps, **options):
    """SakanaAI/TAID's `TAID.compute_loss` and `update_t`, in NumPy.

    One entry per step: the step's masked-mean loss (`forward_kl` with the
    interpolated `teacher_probs`: −Σ p_t·log q over real positions) and,
    after the step, `(t, momentum, prev_loss)`.
    """
    t_start, t_end = options.get("t_start", 0.4), options.get("t_end", 1.0)
    alpha, beta = options.get("alpha", 5e-4), options.get("beta", 0.99)
    t, momentum, previous = t_start, 0.0, math.inf
    steps = []
    for step, (s, u, w) in enumerate(
        zip(student_logits, teacher_logits, weights)
    ):
        mixed = (1 - t) * s + t * u
        p = np.exp(mixed - mixed.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        log_q = s - s.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        loss = -np.sum(np.sum(p * log_q, -1) * w) / np.sum(w)
        if not math.isinf(previous):
            change = (previous - loss) / (previous + 1e-15)
            momentum = beta * momentum + (1 - beta) * change
            target = t_start + (t_end - t_start) * step / total_steps
            delta = alpha * (1 / (1 + math.exp(-momentum))) * (1 - t)
            t = min(t_end, max(target, t + delta))
        previous = loss
        steps.append((loss, t, momentum, previous))
    return steps


def _state(term):
    return [
        float(v.numpy())
        for v in (term.interpolation, term.trend, term.previous_loss)
    ]


class TAIDTest(parameterized.TestCase):
    def test_config(self):
        term = ksd.terms.TAID(
            tiny.mlp(seed=1),
            total_steps=40,
            t_start=0.2,
            t_end=0.9,
            alpha=0.01,
            momentum=0.9,
            adaptive=False,
            weight=ksd.schedules.LinearRampUp(ramp_up_steps=4),
            reduction="mean_with_sample_weight",
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertIsInstance(restored, ksd.terms.TAID)
        self.assertIsInstance(restored.weight, ksd.schedules.LinearRampUp)
        for name in ("total_steps", "t_start", "t_end", "alpha", "momentum"):
            self.assertEqual(getattr(restored, name), getattr(term, name))
        self.assertFalse(restored.adaptive)
        self.assertEqual(restored.reduction, "mean_with_sample_weight")
        self.assertEqual(restored.name, "taid")
        self.assertAlmostEqual(_state(restored)[0], 0.2)

    @parameterized.named_parameters(
        ("total_steps", dict(total_steps=0), ValueError, "total_steps=0"),
        ("t_start", dict(t_start=1.0), ValueError, r"t_start=1\.0"),
        ("order", dict(t_start=0.5, t_end=0.5), ValueError, "below"),
        ("alpha", dict(alpha=-1), ValueError, "alpha=-1"),
        ("momentum", dict(momentum=1.0), ValueError, r"\[0, 1\)"),
        ("adaptive", dict(adaptive=1), TypeError, "adaptive=1"),
        ("loss", dict(loss="jsd"), ValueError, "loss='jsd'"),
        ("temperature", dict(temperature=2.0), ValueError, "temperature"),
    )
    def test_bad_arguments(self, changes, error, message):
        arguments = {"total_steps": 10, **changes}
        with self.assertRaisesRegex(error, message):
            ksd.terms.TAID(tiny.mlp(seed=1), **arguments)

    @parameterized.named_parameters(
        ("schedule_bound", dict(), False),
        ("adaptive_bound", dict(alpha=0.5, beta=0.5), False),
        ("weighted", dict(alpha=0.5, beta=0.5), True),
    )
    def test_every_step_follows_the_official_update(self, options, weighted):
        # Zero learning rate: the logits of each batch are the models'
        # outputs, so the official code's loss and update can be replayed
        # on them in NumPy, step by step (8 steps of 4 samples).
        x, y = tiny.data(n=32, seed=4)
        teacher, student = tiny.mlp(seed=3), tiny.mlp(seed=5)
        w = np.ones(32, "float32")
        if weighted:
            w = (np.arange(32) % 3 != 0).astype("float32")
        taid = dict(options)
        taid["momentum"] = taid.pop("beta", 0.99)
        term = ksd.terms.TAID(teacher, total_steps=6, **taid)
        distiller = ksd.Distiller(student, [term])
        distiller.compile(optimizer=keras.optimizers.SGD(0.0))
        steps = _official(
            [student.predict(x[i : i + 4], verbose=0) for i in range(0, 32, 4)],
            [teacher.predict(x[i : i + 4], verbose=0) for i in range(0, 32, 4)],
            [w[i : i + 4] for i in range(0, 32, 4)],
            total_steps=6,
            **options,
        )
        history = distiller.fit(
            x,
            y,
            sample_weight=w,
            batch_size=4,
            epochs=1,
            shuffle=False,
            verbose=0,
        ).history
        # After the last step (step 7, past total_steps: held at t_end).
        np.testing.assert_allclose(_state(term), steps[-1][1:], rtol=1e-5)
        self.assertAlmostEqual(history["taid_t"][0], steps[-1][1], places=5)
        if not weighted:
            # Keras's reduction of a step is the mean here; the epoch's
            # logged loss is the mean of the steps'.
            np.testing.assert_allclose(
                history["taid_loss"][0],
                np.mean([s[0] for s in steps]),
                rtol=1e-5,
            )
        if options:
            # The adaptive branch moved t ahead of the linear schedule.
            self.assertGreater(steps[3][1], 0.4 + 0.6 * 3 / 6)

    def test_gradient_is_the_kl_to_the_interpolated_target(self):
        # d/ds of −Σ p_t·log softmax(s), p_t held: softmax(s) − p_t.
        teacher, student = tiny.mlp(seed=3), tiny.mlp(seed=5)
        x, _ = tiny.data(n=6)
        term = ksd.terms.TAID(teacher, total_steps=10, t_start=0.3)
        ksd.Distiller(student, [term])
        s = student.predict(x, verbose=0)
        u = teacher.predict(x, verbose=0)
        p = tiny.softmax(0.7 * s + 0.3 * u)

        def loss(logits):
            return term.compute_loss(x, None, logits, None, 0, 0)

        np.testing.assert_allclose(
            tiny.gradient(loss, s), (tiny.softmax(s) - p) / 6, atol=1e-6
        )

    def test_resumes_exactly_after_saving(self):
        x, y = tiny.data(n=32, seed=2)

        def distiller():
            keras.utils.set_random_seed(1)
            term = ksd.terms.TAID(
                tiny.mlp(seed=3), total_steps=16, alpha=0.3, momentum=0.5
            )
            model = ksd.Distiller(tiny.mlp(seed=5), [term])
            model.compile(optimizer="adam", loss=tiny.sparse_ce())
            return model

        whole = distiller()
        whole.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        first = distiller()
        first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        path = os.path.join(self.create_tempdir().full_path, "taid.keras")
        first.save(path)
        resumed = keras.saving.load_model(path)
        history = resumed.fit(
            x, y, batch_size=8, epochs=1, shuffle=False, verbose=0
        ).history
        np.testing.assert_allclose(
            _state(resumed.terms[0]), _state(whole.terms[0]), rtol=1e-6
        )
        self.assertAlmostEqual(
            history["taid_t"][0], _state(whole.terms[0])[0], places=6
        )
        for a, b in zip(
            resumed.student.get_weights(), whole.student.get_weights()
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
