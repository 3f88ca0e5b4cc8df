import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from keras_selfdistill.terms.on_policy import continue_sequences
from tests import tiny


def _windows(seed=0, n=16, length=6, vocabulary=11):
    """Token windows `x` and their next-token labels `y`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocabulary, size=(n, length + 1)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def _gkd(fraction, temperature=0.0, loss=None):
    terms = [
        ksd.terms.Distillation(
            tiny.language_model(seed=1),
            loss="jsd",
            reduction="mean_with_sample_weight",
        ),
        ksd.terms.OnPolicy(
            prompt_length=2, fraction=fraction, temperature=temperature, seed=3
        ),
    ]
    distiller = ksd.Distiller(tiny.language_model(seed=2), terms)
    distiller.compile(optimizer="adam", loss=loss)
    return distiller


class ContinueSequencesTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        # A bigram "model": the logits at a position depend on its token.
        self.table = rng.normal(size=(5, 5)).astype("float32") * 2

    def _logits_of(self, tokens):
        return keras.ops.take(self.table, tokens, axis=0)

    def test_greedy_follows_the_model_and_keeps_the_prompt(self):
        tokens = np.array([[1, 4, 0, 0, 0, 0], [3, 2, 2, 2, 2, 2]], "int32")
        noise = np.zeros((2, 6), "float32")
        got = keras.ops.convert_to_numpy(
            continue_sequences(self._logits_of, tokens, 2, 0.0, noise)
        )
        expected = tokens.copy()
        for i in range(2, 6):
            expected[:, i] = self.table[expected[:, i - 1]].argmax(-1)
        np.testing.assert_array_equal(got, expected)

    def test_samples_follow_the_tempered_distribution(self):
        # 20,000 rows generate one token after the prompt token 2: the
        # frequencies match softmax(table[2] / T) (standard error < 0.004).
        n, temperature = 20000, 2.0
        tokens = np.full((n, 2), 2, "int32")
        noise = keras.random.uniform((n, 2), seed=7)
        got = keras.ops.convert_to_numpy(
            continue_sequences(self._logits_of, tokens, 1, temperature, noise)
        )
        self.assertTrue(np.all(got[:, 0] == 2))
        frequencies = np.bincount(got[:, 1], minlength=5) / n
        np.testing.assert_allclose(
            frequencies, tiny.softmax(self.table[2] / temperature), atol=0.015
        )


class OnPolicyTest(parameterized.TestCase):
    def test_config(self):
        term = ksd.terms.OnPolicy(
            4,
            fraction=0.25,
            temperature=0.7,
            seed=5,
            max_new_tokens=3,
            stop_token_ids=[1, 2],
        )
        config = term.get_config()
        self.assertNotIn("weight", config)
        restored = ksd.terms.OnPolicy.from_config(config)
        self.assertEqual(
            (restored.prompt_length, restored.fraction, restored.temperature),
            (4, 0.25, 0.7),
        )
        self.assertEqual(restored.max_new_tokens, 3)
        self.assertEqual(restored.stop_token_ids, (1, 2))
        self.assertEqual(
            ksd.terms.OnPolicy(2, stop_token_ids=7).stop_token_ids, (7,)
        )
        self.assertEqual(restored.seed, 5)
        self.assertFalse(restored.has_loss)

    def test_rejects_bad_arguments(self):
        for kwargs, message in (
            ({"prompt_length": 0}, "prompt_length=0"),
            ({"prompt_length": 2, "fraction": 0.0}, "fraction=0.0"),
            ({"prompt_length": 2, "fraction": 1.5}, "fraction=1.5"),
            ({"prompt_length": 2, "temperature": -1}, "temperature=-1"),
            ({"prompt_length": 2, "max_new_tokens": 0}, "max_new_tokens=0"),
            ({"prompt_length": 2, "stop_token_ids": "a"}, "stop_token_ids='a'"),
            ({"prompt_length": 2, "stop_token_ids": [-1]}, r"\[-1\]"),
            ({"prompt_length": 2, "stop_token_ids": []}, r"\[\]"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                ksd.terms.OnPolicy(**kwargs)
        with self.assertRaisesRegex(TypeError, "seed='a'"):
            ksd.terms.OnPolicy(2, seed="a")

    def _greedy(self, student, x, y, end):
        """The student's greedy continuation of x + y's last, to `end`."""
        full = np.concatenate([x, y[:, -1:]], axis=1)
        for i in range(2, end):
            logits = student.predict(full[:, :6], verbose=0)
            full[:, i] = logits[:, i - 1].argmax(-1)
        return full

    @parameterized.named_parameters(
        ("to_the_end", None, False),
        ("max_new_tokens", 3, False),
        ("stop_token", None, True),
        ("both", 4, True),
    )
    def test_rewritten_batch(self, max_new_tokens, stop):
        distiller = _gkd(1.0)
        x, y = _windows(n=4)
        term = distiller.terms[1]
        end = 7 if max_new_tokens is None else 2 + max_new_tokens
        expected = self._greedy(distiller.student, x, y, end)
        if stop:
            # Row 0 stops at position 3, whatever the others do.
            term.stop_token_ids = (int(expected[0, 3]),)
        term.max_new_tokens = max_new_tokens
        weights = np.ones((4, 6), "float32")
        new_x, new_y, new_weights = [
            keras.ops.convert_to_numpy(t)
            for t in term.rewrite_batch(x, y, weights)
        ]
        np.testing.assert_array_equal(new_x[:, :2], x[:, :2])
        np.testing.assert_array_equal(new_y[:, :-1], new_x[:, 1:])
        # The student's own greedy continuation of the prompt; the tokens
        # after max_new_tokens are the dataset's.
        np.testing.assert_array_equal(new_x, expected[:, :6])
        np.testing.assert_array_equal(new_y, expected[:, 1:])
        # Position t predicts token t + 1: the prompt's predictions
        # (position 0), those past max_new_tokens and those after a
        # generated stop token are not trained.
        reference = np.zeros((4, 6), "float32")
        for row in range(4):
            for t in range(1, end - 1):
                generated = expected[row, 2 : t + 1]
                if stop and np.isin(generated, term.stop_token_ids).any():
                    break
                reference[row, t] = 1
        if stop:
            # Row 0's token at 3 is a stop token: its prediction (position
            # 2) may count, the next one (position 3) does not.
            self.assertEqual(reference[0, 3], 0)
        np.testing.assert_array_equal(new_weights, reference)

    def test_dict_inputs(self):
        # KerasHub's causal LMs take token ids and a padding mask.
        tokens = keras.Input((6,), dtype="int32", name="token_ids")
        mask = keras.Input((6,), dtype="int32", name="padding_mask")
        h = keras.layers.Embedding(11, 4)(tokens)
        h = h * keras.ops.cast(mask, "float32")[..., None]
        student = keras.Model(
            {"token_ids": tokens, "padding_mask": mask},
            keras.layers.Dense(11)(h),
        )
        distiller = ksd.Distiller(student, [ksd.terms.OnPolicy(2)])
        x, y = _windows(n=3)
        inputs = {"token_ids": x, "padding_mask": np.zeros_like(x)}
        term = distiller.terms[0]
        new_x, _, _ = term.rewrite_batch(inputs, y, None)
        np.testing.assert_array_equal(new_x["padding_mask"], np.ones_like(x))
        np.testing.assert_array_equal(new_x["token_ids"][:, :2], x[:, :2])

    def test_on_policy_steps_never_read_the_dataset_continuation(self):
        # Datasets that differ after the prompt train to the same weights
        # when every step is on-policy, and to different ones otherwise.
        x, y = _windows()
        other_x, other_y = x.copy(), y.copy()
        other_x[:, 2:] = (x[:, 2:] + 5) % 11
        other_y[:, 1:] = (y[:, 1:] + 3) % 11
        for fraction, same in ((1.0, True), (0.3, False)):
            weights = []
            for data in ((x, y), (other_x, other_y)):
                distiller = _gkd(fraction, temperature=1.0)
                distiller.fit(*data, batch_size=4, epochs=2, verbose=0)
                weights.append(distiller.student.get_weights())
            gap = max(np.abs(a - b).max() for a, b in zip(*weights))
            self.assertEqual(gap == 0.0, same, (fraction, gap))

    def test_seed_state_is_saved(self):
        # The coins and samples of a resumed run continue the stream.
        distiller = _gkd(0.5, temperature=1.0)
        distiller.fit(*_windows(), batch_size=4, epochs=1, verbose=0)
        state = distiller.terms[1].seed_generator.state
        path = self.create_tempdir().full_path + "/d.weights.h5"
        distiller.save_weights(path)
        restored = _gkd(0.5, temperature=1.0)
        restored.load_weights(path)
        np.testing.assert_array_equal(
            restored.terms[1].seed_generator.state, state
        )
        self.assertGreater(int(keras.ops.convert_to_numpy(state)[1]), 0)

    def test_refuses_a_compiled_loss(self):
        distiller = _gkd(1.0, loss=tiny.sparse_ce())
        with self.assertRaisesRegex(ValueError, "without `loss`"):
            distiller.fit(*_windows(), batch_size=4, epochs=1, verbose=0)

    def test_one_batch_rewriting_term(self):
        with self.assertRaisesRegex(ValueError, "At most one term may replace"):
            ksd.Distiller(
                tiny.language_model(),
                [ksd.terms.OnPolicy(2), ksd.terms.OnPolicy(3, name="again")],
            )

    def test_refuses_sequences_without_a_continuation(self):
        distiller = _gkd(1.0)
        distiller.terms[1].prompt_length = 6
        with self.assertRaisesRegex(ValueError, "nothing is left to generate"):
            distiller.fit(*_windows(), batch_size=4, epochs=1, verbose=0)
