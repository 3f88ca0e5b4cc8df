import os
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import absltest

import keras_selfdistill as ksd
from keras_selfdistill import _internals

L = keras.layers
# int4 (Keras 3.11 and later) is further from the float model than int8.
INTEGER = "int4" if "int4" in _internals.quantization_modes() else "int8"


def numpy(value):
    return np.float64(_internals.to_numpy(value))


def trained_teacher(seed=0):
    """A small MLP with a normalisation (which Keras does not quantise),
    fitted to a fixed random rule so that its weights are not at init."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,), name="features")
    h = L.Dense(32, activation="relu", name="hidden")(x)
    h = L.LayerNormalization(name="norm")(h)
    model = keras.Model(x, L.Dense(5, name="logits")(h), name="teacher")
    data = np.random.default_rng(seed).normal(size=(256, 8)).astype("float32")
    labels = np.argmax(data[:, :5] + data[:, 3:], axis=-1)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(data, labels, epochs=10, batch_size=64, verbose=0)
    return model, data, labels


def mean_kl(teacher, student, x):
    t = numpy(keras.ops.log_softmax(teacher(x)))
    s = numpy(keras.ops.log_softmax(student(x)))
    return float(np.mean(np.sum(np.exp(t) * (t - s), axis=-1)))


class QuantizeTest(absltest.TestCase):
    def test_a_quantised_copy_leaves_the_original_untouched(self):
        teacher, x, _ = trained_teacher()
        teacher.trainable = False
        weights = [numpy(w) for w in teacher.weights]
        copy = ksd.pruning.quantize(teacher, "int8")
        self.assertEqual(copy.get_layer("hidden").quantization_mode, "int8")
        self.assertEqual(
            _internals.to_numpy(copy.get_layer("hidden")._kernel).dtype,
            np.int8,
        )
        self.assertIsNone(teacher.get_layer("hidden").quantization_mode)
        for before, after in zip(weights, teacher.weights):
            np.testing.assert_array_equal(before, numpy(after))
        # int8 weights and inputs: close to the float model, not equal.
        difference = np.abs(numpy(copy(x)) - numpy(teacher(x))).max()
        self.assertGreater(difference, 0.0)
        self.assertLess(difference, 0.05 * np.abs(numpy(teacher(x))).max())
        # The integer layers are frozen, the float ones trainable, though
        # the original is frozen.
        self.assertEqual(
            [w.path for w in copy.trainable_weights],
            ["norm/gamma", "norm/beta"],
        )
        self.assertEqual(copy.layers[0].name, "features")

    def test_float8_keeps_its_kernels_trainable(self):
        teacher, _, _ = trained_teacher()
        copy = ksd.pruning.quantize(teacher, "float8")
        self.assertIn("hidden/kernel", [w.path for w in copy.trainable_weights])

    def test_lora_distillation_trains_only_the_adapters(self):
        # QLoRA-style: integer kernels, scales, biases and the normalisation
        # stay as quantised; the adapters learn the float teacher, and the
        # student moves towards it.
        teacher, x, y = trained_teacher()
        student = ksd.pruning.quantize(teacher, INTEGER, lora_rank=4)
        self.assertEqual(
            sorted(w.path for w in student.trainable_weights),
            [
                "hidden/lora_kernel_a",
                "hidden/lora_kernel_b",
                "logits/lora_kernel_a",
                "logits/lora_kernel_b",
            ],
        )
        if INTEGER == "int8":
            # int8 alone is too close to the float model to measure a
            # recovery: start the adapters away from zero.
            rng = np.random.default_rng(0)
            for layer in (
                student.get_layer("hidden"),
                student.get_layer("logits"),
            ):
                b = layer.lora_kernel_b
                b.assign(0.3 * rng.normal(size=b.shape).astype("float32"))
        before = {w.path: numpy(w) for w in student.weights}
        kl_before = mean_kl(teacher, student, x)
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
        distiller.fit(x, y, epochs=5, batch_size=32, verbose=0)
        for weight in student.weights:
            changed = not np.array_equal(before[weight.path], numpy(weight))
            self.assertEqual(changed, "lora_kernel" in weight.path, weight.path)
        self.assertLess(mean_kl(teacher, student, x), 0.5 * kl_before)

    def test_the_saved_student_loads_without_the_library(self):
        teacher, x, _ = trained_teacher()
        student = ksd.pruning.quantize(teacher, "int8", lora_rank=2)
        layer = student.get_layer("logits")
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.1))
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "student.keras")
            student.save(path)
            loaded = keras.saving.load_model(path)
        self.assertEqual(loaded.get_layer("logits").quantization_mode, "int8")
        # Keras merges the adapters into a re-quantised kernel.
        np.testing.assert_allclose(
            numpy(loaded(x)), numpy(student(x)), rtol=0.05, atol=0.05
        )

    def test_bad_input(self):
        teacher, x, y = trained_teacher()
        with self.assertRaisesRegex(ValueError, "GPTQ and AWQ"):
            ksd.pruning.quantize(teacher, "gptq")
        if "int4" not in _internals.quantization_modes():
            with self.assertRaisesRegex(ValueError, "no int4 quantisation"):
                ksd.pruning.quantize(teacher, "int4")
        with self.assertRaisesRegex(ValueError, "positive integer"):
            ksd.pruning.quantize(teacher, "int8", lora_rank=0)
        with self.assertRaisesRegex(ValueError, "trains its own kernel"):
            ksd.pruning.quantize(teacher, "float8", lora_rank=2)
        with self.assertRaisesRegex(TypeError, "copies a `keras.Model`"):
            ksd.pruning.quantize(L.Dense(2), "int8")
        with self.assertRaisesRegex(ValueError, "not built"):
            ksd.pruning.quantize(keras.Sequential([L.Dense(2)]), "int8")
        convolutions = keras.Sequential(
            [keras.Input((4, 4, 1)), L.Conv2D(2, 3)], name="convolutions"
        )
        with self.assertRaisesRegex(ValueError, "no layer that Keras"):
            ksd.pruning.quantize(convolutions, "int8")
        quantised = ksd.pruning.quantize(teacher, "int8")
        with self.assertRaisesRegex(ValueError, "already quantised"):
            ksd.pruning.quantize(quantised, "int8")

    def test_excluded_layers_stay_float(self):
        teacher, x, y = trained_teacher()
        adapted = ksd.pruning.quantize(
            teacher, "int8", lora_rank=2, exclude=["logits"]
        )
        self.assertIsNone(adapted.get_layer("logits").quantization_mode)
        self.assertFalse(adapted.get_layer("logits").trainable_weights)
        self.assertEqual(adapted.get_layer("hidden").quantization_mode, "int8")
        plain = ksd.pruning.quantize(teacher, "int8", exclude=["logits"])
        self.assertLen(plain.get_layer("logits").trainable_weights, 2)
        with self.assertRaisesRegex(ValueError, r"no layers \['head'\]"):
            ksd.pruning.quantize(teacher, "int8", exclude=["head"])
        with self.assertRaisesRegex(TypeError, "lists layer names"):
            ksd.pruning.quantize(teacher, "int8", exclude="logits")

    def test_fit_refuses_integer_kernels_asked_to_train(self):
        teacher, x, y = trained_teacher()
        student = ksd.pruning.quantize(teacher, "int8")
        student.get_layer("hidden").trainable = True
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        distiller.compile(optimizer="adam")
        with self.assertRaisesRegex(
            ValueError, r"Layers \['hidden'\] .* integer kernel takes no"
        ):
            distiller.fit(x, y, epochs=1, verbose=0)

    def test_fit_refuses_backup_and_restore_of_adapters(self):
        teacher, x, y = trained_teacher()
        student = ksd.pruning.quantize(teacher, "int8", lora_rank=2)
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        distiller.compile(optimizer="adam")
        with tempfile.TemporaryDirectory() as directory:
            backup = keras.callbacks.BackupAndRestore(directory)
            with self.assertRaisesRegex(ValueError, "loads them as zeros"):
                distiller.fit(x, y, epochs=1, verbose=0, callbacks=[backup])


@pytest.mark.slow
class QuantizeBackboneTest(absltest.TestCase):
    def test_a_keras_hub_backbone_keeps_its_class(self):
        keras_hub = pytest.importorskip("keras_hub")
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=30,
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=12,
            max_sequence_length=8,
            dropout=0.0,
        )
        x = {
            "token_ids": np.arange(12, dtype="int32").reshape(2, 6),
            "padding_mask": np.ones((2, 6), "int32"),
        }
        copy = ksd.pruning.quantize(backbone, "int8", lora_rank=2)
        self.assertIsInstance(copy, keras_hub.models.GPT2Backbone)
        self.assertEqual(
            copy.get_layer("token_embedding").quantization_mode, "int8"
        )
        self.assertTrue(copy.trainable_weights)
        self.assertTrue(
            all("lora" in w.name for w in copy.trainable_weights),
        )
        np.testing.assert_allclose(
            numpy(copy(x)), numpy(backbone(x)), rtol=0.1, atol=0.1
        )

    def test_an_int8_lm_head_is_refused_and_kept_float_trains(self):
        # KerasHub's int8 `ReversibleEmbedding` called in reverse passes
        # no gradient through its quantised inputs: training below it
        # raises the loss. Refused; with the embedding float, distilling
        # into the adapters lowers the KL to the teacher.
        keras_hub = pytest.importorskip("keras_hub")

        def causal_lm(seed, num_layers):
            keras.utils.set_random_seed(seed)
            backbone = keras_hub.models.GPT2Backbone(
                vocabulary_size=20,
                num_layers=num_layers,
                num_heads=2,
                hidden_dim=8,
                intermediate_dim=16,
                max_sequence_length=8,
                dropout=0.0,
            )
            return keras_hub.models.GPT2CausalLM(
                backbone=backbone, preprocessor=None
            )

        ids = np.random.default_rng(0).integers(0, 20, (64, 8))
        ids = ids.astype("int32")
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
        teacher, student = causal_lm(0, 2), causal_lm(1, 1)
        for exclude in (None, ["token_embedding"]):
            adapted = ksd.pruning.quantize(
                student, "int8", lora_rank=2, exclude=exclude
            )
            distiller = ksd.Distiller(
                adapted, [ksd.terms.Distillation(teacher, loss="kl")]
            )
            distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
            if exclude is None:
                with self.assertRaisesRegex(ValueError, "no gradient"):
                    distiller.fit(x, epochs=1, verbose=0)
                continue
            before = mean_kl(teacher, adapted, x)
            distiller.fit(x, epochs=4, batch_size=16, verbose=0)
            self.assertLess(mean_kl(teacher, adapted, x), 0.9 * before)


if __name__ == "__main__":
    absltest.main()
