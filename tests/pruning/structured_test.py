import keras
import numpy as np
from absl.testing import absltest

import keras_selfdistill as ksd
from keras_selfdistill import _internals
from tests import tiny

L = keras.layers


def residual_cnn(seed=0):
    """c1 → bn → relu → (+ c2) → pool → [·, c3] → depthwise → flatten →
    fc → out: a residual group {c1, c2}, a concatenation, a flatten."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 2), name="image")
    h = L.ReLU(name="relu")(
        L.BatchNormalization(name="bn")(
            L.Conv2D(4, 3, padding="same", name="c1")(x)
        )
    )
    h = L.Add(name="add")([h, L.Conv2D(4, 3, padding="same", name="c2")(h)])
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Concatenate(name="cat")([h, L.Conv2D(3, 1, name="c3")(h)])
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.Dense(5, activation="relu", name="fc")(L.Flatten(name="flat")(h))
    model = keras.Model(x, L.Dense(3, name="out")(h))
    rng = np.random.default_rng(seed)
    bn = model.get_layer("bn")
    bn.set_weights([rng.uniform(0.5, 2, (4,)) for _ in bn.weights])
    return model


def images(n=5, seed=0):
    return (
        np.random.default_rng(seed).normal(size=(n, 6, 6, 2)).astype("float32")
    )


def weights(model, name):
    return [_internals.to_numpy(w) for w in model.get_layer(name).weights]


def zero_rows(model, name, rows):
    """Zeroes the input rows `rows` of a layer's kernel, in place."""
    layer = model.get_layer(name)
    kernel = _internals.to_numpy(layer.kernel).copy()
    kernel[..., rows, :] = 0.0
    layer.kernel.assign(kernel)


class PruneTest(absltest.TestCase):
    def test_nothing_removed_equals_the_original(self):
        model, x = residual_cnn(), images()
        for pruned in (
            ksd.pruning.prune(model, 0.0),
            ksd.pruning.prune(model, keep={"c1": [0, 1, 2, 3]}),
        ):
            np.testing.assert_array_equal(pruned(x), model(x))
            self.assertEqual(pruned.count_params(), model.count_params())

    def test_removing_a_residual_channel_removes_exactly_its_path(self):
        # Channel 1 of {c1, c2} reaches the output only through its
        # readers: c2's input row 1, c3's, and fc's rows for channel 1 at
        # each of the 9 positions of the flattened 3 × 3 × 7 map. Zeroing
        # those in the original must give the pruned model's outputs.
        model, x = residual_cnn(), images()
        pruned = ksd.pruning.prune(model, keep={"c1": [0, 2, 3]})
        zero_rows(model, "c2", [1])
        zero_rows(model, "c3", [1])
        zero_rows(model, "fc", [7 * p + 1 for p in range(9)])
        np.testing.assert_allclose(pruned(x), model(x), rtol=1e-5, atol=1e-6)
        self.assertEqual(pruned.get_layer("c2").filters, 3)
        self.assertEqual(pruned.get_layer("dw").kernel.shape, (3, 3, 6, 1))

    def test_removing_a_concatenated_channel_removes_exactly_its_path(self):
        # c3's channel 2 sits at 4 + 2 = 6 of the concatenation.
        model, x = residual_cnn(), images()
        pruned = ksd.pruning.prune(model, keep={"c3": [0, 1]})
        zero_rows(model, "fc", [7 * p + 6 for p in range(9)])
        np.testing.assert_allclose(pruned(x), model(x), rtol=1e-5, atol=1e-6)

    def test_removing_a_unit_removes_exactly_its_path(self):
        model, x = tiny.mlp(hidden=6), tiny.data()[0]
        pruned = ksd.pruning.prune(
            model, keep={model.layers[0].name: [0, 1, 3, 4, 5]}
        )
        zero_rows(model, model.layers[1].name, [2])
        np.testing.assert_allclose(pruned(x), model(x), rtol=1e-5, atol=1e-6)
        self.assertIsInstance(pruned, keras.Sequential)

    def test_kept_weights_are_the_originals(self):
        model = residual_cnn()
        pruned = ksd.pruning.prune(model, keep={"c1": [0, 3], "fc": [1, 4]})
        kernel, bias = weights(model, "c2")
        new_kernel, new_bias = weights(pruned, "c2")
        np.testing.assert_array_equal(
            new_kernel, kernel[:, :, [0, 3]][..., [0, 3]]
        )
        np.testing.assert_array_equal(new_bias, bias[[0, 3]])
        for old, new in zip(weights(model, "bn"), weights(pruned, "bn")):
            np.testing.assert_array_equal(new, old[[0, 3]])
        np.testing.assert_array_equal(
            weights(pruned, "out")[0], weights(model, "out")[0][[1, 4]]
        )

    def test_ratio_keeps_the_highest_scores(self):
        model = residual_cnn()
        scores = {
            "c1": np.array([3.0, 1.0, 4.0, 2.0]),
            "c3": np.arange(3.0),
            "fc": np.array([5.0, 1.0, 1.0, 0.0, 2.0]),
        }
        pruned = ksd.pruning.prune(model, 0.5, scores=scores)
        # floor(0.5 · size) go: 2 of 4, 1 of 3, 2 of 5 (the tie at 1.0
        # keeps the lower index).
        np.testing.assert_array_equal(
            weights(pruned, "c1")[1], weights(model, "c1")[1][[0, 2]]
        )
        np.testing.assert_array_equal(
            weights(pruned, "c3")[1], weights(model, "c3")[1][[1, 2]]
        )
        np.testing.assert_array_equal(
            weights(pruned, "fc")[1], weights(model, "fc")[1][[0, 1, 4]]
        )
        partial = ksd.pruning.prune(model, {"fc": 0.4}, scores=scores)
        self.assertEqual(partial.get_layer("c1").filters, 4)
        self.assertEqual(partial.get_layer("fc").units, 3)

    def test_the_original_is_untouched_and_the_result_loads_without_us(self):
        model, x = residual_cnn(), images()
        model.trainable = False
        before = model(x)
        pruned = ksd.pruning.prune(model, 0.5)
        self.assertFalse(model.trainable)
        self.assertLen(pruned.trainable_weights, 14)
        np.testing.assert_array_equal(model(x), before)
        self.assertNotIn("keras_selfdistill", str(pruned.get_config()))
        self.assertEqual(pruned.inputs[0].name, "image")
        path = self.create_tempfile("pruned.keras").full_path
        pruned.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(loaded(x), pruned(x), rtol=1e-6)

    def test_a_compiled_original_gives_an_uncompiled_model(self):
        # Keras's `clone_model` compiles a compiled model's clone with its
        # optimizer, whose state saving then writes beside the weights.
        model = residual_cnn()
        model.compile(optimizer="adam", loss="mse")
        pruned = ksd.pruning.prune(model, 0.5)
        self.assertFalse(pruned.compiled)
        self.assertIsNone(getattr(pruned, "optimizer", None))
        self.assertTrue(model.compiled)

        copy = ksd.diffusion.trainable_copy(model)
        self.assertFalse(copy.compiled)


class PruneBadInputTest(absltest.TestCase):
    def test_ratio_that_removes_every_channel(self):
        with self.assertRaisesRegex(ValueError, r"in \[0, 1\).*ratio=1"):
            ksd.pruning.prune(residual_cnn(), {"c1": 1})

    def test_keep_of_no_channel_or_out_of_range(self):
        model = residual_cnn()
        with self.assertRaisesRegex(ValueError, "keeps no channel"):
            ksd.pruning.prune(model, keep={"c1": np.array([], int)})
        with self.assertRaisesRegex(
            ValueError, r"distinct channel indices in \[0, 4\)"
        ):
            ksd.pruning.prune(model, keep={"c1": [0, 4]})
        with self.assertRaisesRegex(ValueError, "distinct"):
            ksd.pruning.prune(model, keep={"c1": [1, 1]})

    def test_a_group_that_is_not_one_or_is_an_output(self):
        model = residual_cnn()
        with self.assertRaisesRegex(
            ValueError,
            r"'c2', which is not a group.*\['c1', 'c3', 'fc', 'out'\]",
        ):
            ksd.pruning.prune(model, keep={"c2": [0]})
        with self.assertRaisesRegex(
            ValueError, "'out' cannot be pruned: it is a model output"
        ):
            ksd.pruning.prune(model, {"out": 0.5})

    def test_a_layer_it_cannot_follow_is_named(self):
        x = keras.Input((4,))
        h = L.Dense(6, name="a")(x)
        h = L.Lambda(lambda t: 2.0 * t, name="double")(h)
        model = keras.Model(x, L.Dense(2, name="b")(L.Dense(5, name="c")(h)))
        with self.assertRaisesRegex(
            ValueError,
            r"'a': the layer 'double' \(Lambda\) cannot be followed.*\['c'\]",
        ):
            ksd.pruning.prune(model, 0.5)
        with self.assertRaisesRegex(
            ValueError, "'a' cannot be pruned: the layer 'double'"
        ):
            ksd.pruning.prune(model, {"a": 0.5})
        self.assertEqual(
            ksd.pruning.prune(model, {"c": 0.5}).get_layer("c").units, 3
        )

    def test_an_add_that_cannot_keep_channels_aligned(self):
        x = keras.Input((4,))
        a = L.Concatenate()(
            [L.Dense(2, name="a1")(x), L.Dense(2, name="a2")(x)]
        )
        h = L.Add(name="join")([a, L.Dense(4, name="b")(x)])
        model = keras.Model(x, L.Dense(2, name="out")(h))
        with self.assertRaisesRegex(ValueError, "'join' .*split differently"):
            ksd.pruning.prune(model, {"b": 0.5})

    def test_models_it_cannot_prune(self):
        class Subclassed(keras.Model):
            def call(self, x):
                return x

        with self.assertRaisesRegex(ValueError, "subclassed model"):
            ksd.pruning.prune(Subclassed(), 0.5)
        with self.assertRaisesRegex(TypeError, "Functional or Sequential"):
            ksd.pruning.prune(L.Dense(2), 0.5)
        shared = L.Dense(4, name="shared")
        x = keras.Input((4,))
        model = keras.Model(x, shared(shared(x)))
        with self.assertRaisesRegex(
            ValueError, "'shared' is called more than once"
        ):
            ksd.pruning.prune(model, 0.5)
        quantised = tiny.mlp()
        quantised.layers[0].quantize("int8")
        with self.assertRaisesRegex(
            ValueError, "quantised or has LoRA.*prune the float model"
        ):
            ksd.pruning.prune(quantised, 0.5)

    def test_arguments(self):
        model = residual_cnn()
        with self.assertRaisesRegex(ValueError, "either `ratio`"):
            ksd.pruning.prune(model)
        with self.assertRaisesRegex(ValueError, "scores` would be ignored"):
            ksd.pruning.prune(model, keep={"c1": [0]}, scores={})
        with self.assertRaisesRegex(
            ValueError, r"one score per channel of 'c1' \(4\)"
        ):
            ksd.pruning.prune(model, {"c1": 0.5}, scores={"c1": [1.0]})
