import os
import sys
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny
from tests import watchdog
from tests.diffusion import reference


class UNetTest(parameterized.TestCase):
    # The architecture, whatever the backend: once, in the TensorFlow pass.
    @tiny.ONCE
    def test_shapes_and_parameters(self):
        model = ksd.diffusion.unet()
        self.assertEqual(model.count_params(), 394113)
        self.assertEqual(model.output_shape, (None, 28, 28, 1))
        small = ksd.diffusion.unet((8, 12, 3), widths=(4, 8, 8))
        out = small([np.zeros((1, 8, 12, 3)), np.zeros((1,))])
        self.assertEqual(tuple(out.shape), (1, 8, 12, 3))

    @parameterized.named_parameters(
        ("sinusoidal", "sinusoidal"), ("linear", "linear")
    )
    def test_the_time_input_changes_the_output(self, time_embedding):
        model = ksd.diffusion.unet(
            (8, 8, 1), widths=(4, 8), time_embedding=time_embedding
        )
        reference.randomise_zero_layers(keras, model, seed=0, stddev=0.1)
        z = np.random.default_rng(0).normal(size=(1, 8, 8, 1))
        a = keras.ops.convert_to_numpy(model([z, np.array([-5.0])]))
        b = keras.ops.convert_to_numpy(model([z, np.array([5.0])]))
        self.assertGreater(np.abs(a - b).max(), 1e-4)

    @pytest.mark.slow  # the fast tier's CPU budget
    @tiny.ONCE
    def test_loads_without_the_library(self):
        model = ksd.diffusion.unet((8, 8, 1), widths=(4, 8))
        layer = model.get_layer("velocity")
        layer.kernel.assign(np.ones(layer.kernel.shape) * 0.1)
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "unet.keras")
        model.save(path)
        z = np.ones((2, 8, 8, 1), "float32")
        logsnr = np.array([-1.0, 2.0], "float32")
        np.save(os.path.join(folder, "z.npy"), z)
        np.save(os.path.join(folder, "logsnr.npy"), logsnr)
        script = (
            "import sys; sys.modules['keras_selfdistill'] = None\n"
            "import numpy as np, keras\n"
            f"m = keras.saving.load_model({path!r}, safe_mode=True)\n"
            "x = [np.load('z.npy'), np.load('logsnr.npy')]\n"
            "np.save('out.npy', m.predict(x, verbose=0))\n"
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        watchdog.run(
            [sys.executable, "-c", script],
            check=True,
            env=env,
            cwd=folder,
            timeout=300,
        )
        np.testing.assert_allclose(
            np.load(os.path.join(folder, "out.npy")),
            keras.ops.convert_to_numpy(model([z, logsnr])),
            atol=1e-6,
        )

    @parameterized.named_parameters(
        ("float32", "float32", 2e-4),
        # The angles are float32 under a half-precision policy (in bfloat16
        # they were radians off); only the features are rounded.
        ("mixed_bfloat16", "mixed_bfloat16", 4e-3),
    )
    def test_time_features_are_the_official_sinusoids(self, policy, atol):
        # get_timestep_embedding(t, 8, max_time=1) of the official UNet at
        # logsnr_input_type="inv_cos": t = arctan(exp(-λ/2)) / (π/2),
        # 4 frequencies exp(-k·ln(10000)/3), angles 1000·t·frequency.
        keras.config.set_dtype_policy(policy)
        model = ksd.diffusion.unet((8, 8, 1), widths=(4, 8), embedding_dim=8)
        features = keras.Model(
            model.inputs, model.get_layer("time_sinusoids").output
        )
        logsnr = np.array([-25.0, -20.0, -3.0, 0.0, 7.5, 20.0], "float32")
        t = np.arctan(np.exp(-0.5 * np.clip(np.float64(logsnr), -20, 20)))
        t /= 0.5 * np.pi
        frequencies = np.exp(-np.arange(4) * np.log(10000.0) / 3)
        angles = 1000.0 * t[:, None] * frequencies[None, :]
        expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
        got = features([np.zeros((6, 8, 8, 1), "float32"), logsnr])
        got = keras.ops.convert_to_numpy(keras.ops.cast(got, "float32"))
        np.testing.assert_allclose(got, expected, atol=atol)

    @tiny.ONCE
    def test_options(self):
        grouped = ksd.diffusion.unet(
            (8, 8, 1), widths=(8, 16), blocks=2, normalization=True
        )
        self.assertLen(
            [
                layer
                for layer in grouped.layers
                if isinstance(layer, keras.layers.GroupNormalization)
            ],
            # Two per block: 2 blocks down and 3 up per level, the middle
            # block; and one before the output.
            2 * (2 * 2 + 2 * 3 + 1) + 1,
        )
        out = grouped([np.zeros((2, 8, 8, 1)), np.zeros((2,))])
        self.assertEqual(tuple(out.shape), (2, 8, 8, 1))
        with self.assertRaisesRegex(ValueError, "time_embedding"):
            ksd.diffusion.unet(time_embedding="fourier")
        with self.assertRaisesRegex(ValueError, "divisible by the 8 groups"):
            ksd.diffusion.unet(widths=(4, 8), normalization=True)
        with self.assertRaisesRegex(ValueError, "blocks"):
            ksd.diffusion.unet(blocks=0)

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "divisible by 4"):
            ksd.diffusion.unet((10, 10, 1))
        with self.assertRaisesRegex(ValueError, "height, width, channels"):
            ksd.diffusion.unet((28, 28))
        with self.assertRaisesRegex(ValueError, "positive integers"):
            ksd.diffusion.unet(widths=(16, 0))


class TrainableCopyTest(parameterized.TestCase):
    def test_a_frozen_teacher_s_copy_trains(self):
        # A clone of a frozen model stays frozen on TensorFlow even after
        # `trainable = True`; the copy is trainable on both backends.
        model = reference.unet(keras, ksd, seed=1)
        ksd.teachers.FrozenModel(model)
        self.assertFalse(model.trainable_variables)
        copy = ksd.diffusion.trainable_copy(model)
        self.assertLen(copy.trainable_variables, len(model.weights))
        for a, b in zip(model.get_weights(), copy.get_weights()):
            np.testing.assert_array_equal(a, b)
        z = np.random.default_rng(0).normal(size=(2, 8, 8, 1))
        logsnr = np.array([-1.0, 3.0])
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(copy([z, logsnr])),
            keras.ops.convert_to_numpy(model([z, logsnr])),
            atol=1e-6,
        )
