import os

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny
from tests.diffusion import reference


class _Count(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.fits = 0

    def on_train_begin(self, logs=None):
        self.fits += 1


class _Interrupt(keras.callbacks.Callback):
    """Raises in the second round's second epoch, as a crash would."""

    def __init__(self):
        super().__init__()
        self.rounds = 0

    def on_train_begin(self, logs=None):
        self.rounds += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.rounds == 2 and epoch == 1:
            raise RuntimeError("interrupted")


def _images():
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(16, 8, 8, 1)).astype("float32")


def _rounds(directory=None, callbacks=(), end_steps=2):
    return ksd.diffusion.progressive_distillation(
        reference.unet(keras, ksd, seed=1),
        _images(),
        num_steps=8,
        end_steps=end_steps,
        directory=directory,
        compile_kwargs={"optimizer": keras.optimizers.Adam(1e-3)},
        epochs=3,
        batch_size=8,
        shuffle=False,
        seed=7,
        verbose=0,
        callbacks=list(callbacks),
    )


def _weights(model):
    return [np.copy(w) for w in model.get_weights()]


class ProgressiveDistillationTest(parameterized.TestCase):
    # About half a CPU-minute per backend: the slow tier.
    @pytest.mark.slow
    def test_rounds_halve_the_steps_from_the_previous_model(self):
        base = reference.unet(keras, ksd, seed=1)
        before = _weights(base)
        rounds = ksd.diffusion.progressive_distillation(
            base,
            _images(),
            num_steps=8,
            end_steps=2,
            epochs=1,
            batch_size=8,
            verbose=0,
        )
        self.assertEqual([r["num_steps"] for r in rounds], [4, 2])
        for a, b in zip(before, base.get_weights()):
            np.testing.assert_array_equal(a, b)
        self.assertTrue(base.trainable)
        for result in rounds:
            self.assertEqual(len(result["history"]["denoising_loss"]), 1)
        # Each round trained its student away from where it started.
        first, second = (_weights(r["student"]) for r in rounds)
        self.assertGreater(
            max(np.abs(a - b).max() for a, b in zip(before, first)), 0
        )
        self.assertGreater(
            max(np.abs(a - b).max() for a, b in zip(first, second)), 0
        )

    # Backend-independent (files, callbacks and `fit`; the step's resume is
    # the harness's): once, in the TensorFlow pass.
    @tiny.ONCE
    @pytest.mark.slow
    def test_resumes_between_and_within_rounds(self):
        root = self.create_tempdir().full_path
        uninterrupted = _rounds(os.path.join(root, "full"))
        folder = os.path.join(root, "crashed")
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            _rounds(folder, [_Interrupt()])
        self.assertTrue(os.path.exists(os.path.join(folder, "steps-4.keras")))
        self.assertFalse(os.path.exists(os.path.join(folder, "steps-2.keras")))
        counter = _Count()
        resumed = _rounds(folder, [counter])
        # The first round is loaded; the second restarts from its backup
        # of epoch 1 (the crash came before epoch 2's was written) and
        # trains epochs 2 and 3.
        self.assertEqual(counter.fits, 1)
        self.assertLen(resumed[1]["history"]["loss"], 2)
        for one, other in zip(uninterrupted, resumed):
            for a, b in zip(
                one["student"].get_weights(), other["student"].get_weights()
            ):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        again = _Count()
        _rounds(folder, [again])
        self.assertEqual(again.fits, 0)

    @tiny.ONCE
    @pytest.mark.slow
    def test_a_round_made_from_another_model_or_setting_is_refused(self):
        folder = self.create_tempdir().full_path

        def run(seed=1, **kwargs):
            counter = _Count()
            ksd.diffusion.progressive_distillation(
                reference.unet(keras, ksd, seed=seed),
                _images(),
                num_steps=8,
                end_steps=4,
                directory=folder,
                epochs=1,
                batch_size=8,
                verbose=0,
                callbacks=[counter],
                **kwargs,
            )
            return counter.fits

        self.assertEqual(run(), 1)
        self.assertEqual(run(), 0)  # the same base model and settings
        with self.assertRaisesRegex(
            ValueError, "another teacher.*teacher_weights"
        ):
            run(seed=2)  # a retrained base model
        with self.assertRaisesRegex(ValueError, r"\(weighting differ\)"):
            run(weighting="snr")

    @tiny.ONCE
    def test_bad_arguments(self):
        model = reference.unet(keras, ksd, seed=1)
        with self.assertRaisesRegex(ValueError, "power of two"):
            ksd.diffusion.progressive_distillation(model, _images(), 12, 1)
        with self.assertRaisesRegex(ValueError, "power of two"):
            ksd.diffusion.progressive_distillation(model, _images(), 2, 2)
        with self.assertRaisesRegex(ValueError, "no `loss`"):
            ksd.diffusion.progressive_distillation(
                model,
                _images(),
                4,
                compile_kwargs={"optimizer": "adam", "loss": "mse"},
            )
