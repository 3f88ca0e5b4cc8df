"""KerasHub causal LMs (tiny Gemma configurations, no download) in fit."""

from unittest import mock

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from keras_selfdistill import _internals
from keras_selfdistill.terms.on_policy import continue_sequences
from keras_selfdistill.terms.on_policy import continue_with_cache

keras_hub = pytest.importorskip("keras_hub")


def _gemma(layers, seed):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=32,
        num_layers=layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _batch(seed=0, n=4, length=7):
    """What `GemmaCausalLMPreprocessor` yields: inputs, labels, weights."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 32, size=(n, length + 1)).astype("int32")
    mask = np.arange(length + 1) < rng.integers(3, length + 1, size=(n, 1))
    ids[~mask] = 0
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], mask[:, 1:].astype("float32")


def _train(terms, x, y, weights, loss):
    distiller = ksd.Distiller(_gemma(1, seed=2), terms)
    distiller.compile(optimizer="adam", loss=loss)
    history = distiller.fit(
        x, y, sample_weight=weights, batch_size=2, epochs=1, verbose=0
    ).history
    return history, distiller.student.get_weights()


# The slow tier (the fast tier's CPU budget): CI runs it on both backends,
# and `make test-tf-cpu` beside tensorflow-cpu.
@pytest.mark.slow
class KerasHubTest(parameterized.TestCase):
    def setUp(self):
        self.teacher = _gemma(2, seed=1)

    def test_padded_positions_change_nothing(self):
        x, y, weights = _batch()
        other_x = dict(
            x, token_ids=np.where(x["padding_mask"], x["token_ids"], 5)
        )
        other_y = np.where(weights == 1, y, 7)
        results = []
        for inputs, labels in ((x, y), (other_x, other_y)):
            term = ksd.terms.Distillation(
                self.teacher, loss="jsd", reduction="mean_with_sample_weight"
            )
            ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            results.append(_train([term], inputs, labels, weights, ce))
        self.assertTrue(np.isfinite(results[0][0]["distillation_loss"]).all())
        for a, b in zip(results[0][1], results[1][1]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    def test_on_policy_continuations(self):
        # Fully on-policy: the dataset's tokens after the prompt are never
        # read, so datasets that differ there train to the same weights.
        x, y, weights = _batch()
        other_x = dict(x, token_ids=x["token_ids"].copy())
        other_x["token_ids"][:, 3:] = 9
        results = []
        for inputs in (x, other_x):
            terms = [
                ksd.terms.Distillation(
                    self.teacher,
                    loss="jsd",
                    reduction="mean_with_sample_weight",
                ),
                ksd.terms.OnPolicy(prompt_length=3, seed=0),
            ]
            results.append(_train(terms, inputs, y, weights, None))
        for a, b in zip(results[0][1], results[1][1]):
            np.testing.assert_array_equal(a, b)

    @parameterized.named_parameters(
        ("greedy", 0.0, None), ("sampled", 1.0, None), ("max_new", 1.0, 6)
    )
    def test_cached_decoding_equals_full_forwards(self, temperature, end):
        # KerasHub's key/value cache writes what one full forward per token
        # writes, for the same uniforms.
        rng = np.random.default_rng(3)
        tokens = rng.integers(1, 32, (4, 9)).astype("int32")
        noise = keras.random.uniform((4, 9), seed=4)

        def logits_of(sequence):
            sequence = keras.ops.convert_to_tensor(sequence)
            ones = keras.ops.ones_like(sequence)
            return self.teacher({"token_ids": sequence, "padding_mask": ones})

        decoder = _internals.cached_decoder(self.teacher)
        self.assertIsNotNone(decoder)
        got, expected = (
            keras.ops.convert_to_numpy(f(g, tokens, 3, temperature, noise, end))
            for f, g in (
                (continue_with_cache, decoder),
                (continue_sequences, logits_of),
            )
        )
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got[:, :3], tokens[:, :3])
        end = end or 9
        np.testing.assert_array_equal(got[:, end:], tokens[:, end:])
        self.assertGreater(np.mean(got[:, 3:end] != tokens[:, 3:end]), 0.5)

    def test_on_policy_and_sequence_kd_decode_with_the_cache(self):
        x, y, weights = _batch()
        original = keras_hub.models.GemmaCausalLM.call_with_cache
        for term in (
            ksd.terms.OnPolicy(prompt_length=3, max_new_tokens=2, seed=0),
            ksd.terms.SequenceKD(self.teacher, prompt_length=3),
        ):
            terms = [
                ksd.terms.Distillation(
                    self.teacher, reduction="mean_with_sample_weight"
                ),
                term,
            ]
            loss = None
            if isinstance(term, ksd.terms.SequenceKD):
                loss = keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                )
            with mock.patch.object(
                keras_hub.models.GemmaCausalLM,
                "call_with_cache",
                autospec=True,
                side_effect=original,
            ) as spy:
                history, _ = _train(terms, x, y, weights, loss)
            self.assertTrue(np.isfinite(history["loss"]).all())
            self.assertGreater(spy.call_count, 0, type(term).__name__)
