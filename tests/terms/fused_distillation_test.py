"""`FusedDistillation` equals `Distillation` with a compiled label loss.

Each case builds the same student twice, one distiller with the fused
term and one with `Distillation` (and, with labels, a compiled
`SparseCategoricalCrossentropy(from_logits=True)`), and compares the
objective and its gradient with respect to every trainable weight.
"""

import keras
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import keras_selfdistill as ksd
from keras_selfdistill import _fused

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY = 48


def _gemma(layers, seed, vocabulary=VOCABULARY):
    """A tiny Gemma: its head is the token embedding, reversed (tied)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary,
        num_layers=layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _llama(seed, vocabulary=VOCABULARY):
    """A tiny Llama with an untied reverse embedding as its head."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        tie_word_embeddings=False,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _dense_lm(seed, vocabulary=VOCABULARY, width=12):
    """A plain Keras LM whose head is a Dense layer with a bias."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    hidden = keras.layers.Embedding(vocabulary, width)(ids)
    hidden = keras.layers.Dense(width, activation="tanh")(hidden)
    logits = keras.layers.Dense(vocabulary, name="head")(hidden)
    return keras.Model(ids, logits)


def _batch(seed=0, n=4, length=9, vocabulary=VOCABULARY, padding=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocabulary, size=(n, length + 1)).astype("int32")
    mask = np.arange(length + 1) < rng.integers(4, length + 2, size=(n, 1))
    ids[~mask] = 0
    if not padding:
        return ids[:, :-1], ids[:, 1:], mask[:, 1:].astype("float32")
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], mask[:, 1:].astype("float32")


def _loss_and_gradients(distiller, x, y, weights):
    """The training objective and its gradients, one per trainable weight."""
    variables = distiller.trainable_variables
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outputs = distiller(x, training=True)
            loss = distiller.compute_loss(x, y, outputs, weights)
        gradients = tape.gradient(loss, [v.value for v in variables])
        return float(loss), [
            None if g is None else np.asarray(tf.convert_to_tensor(g))
            for g in gradients
        ]
    import jax

    distiller.optimizer.build(variables)

    def objective(trainable):
        loss, _ = distiller.compute_loss_and_updates(
            trainable,
            [v.value for v in distiller.non_trainable_variables],
            [v.value for v in distiller.metrics_variables],
            x,
            y,
            weights,
            training=True,
            optimizer_variables=[
                v.value for v in distiller.optimizer.variables
            ],
        )
        return loss

    loss, gradients = jax.value_and_grad(objective)(
        [v.value for v in variables]
    )
    return float(loss), [np.asarray(g) for g in gradients]


def _compare(test, fused, plain, x, y, weights, frozen=()):
    """Objective within 1e-5 relative, gradients within 1e-4."""
    loss, gradients = _loss_and_gradients(fused, x, y, weights)
    expected, expected_gradients = _loss_and_gradients(plain, x, y, weights)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    paths = [v.path for v in fused.trainable_variables]
    test.assertEqual(
        [v.shape for v in fused.trainable_variables],
        [v.shape for v in plain.trainable_variables],
    )
    checked = 0
    for path, got, want in zip(paths, gradients, expected_gradients):
        if any(name in path for name in frozen):
            continue
        scale = max(float(np.max(np.abs(want))), 1e-12)
        np.testing.assert_allclose(
            got / scale, want / scale, atol=1e-4, err_msg=path
        )
        checked += 1
    test.assertGreater(checked, 0)


def _pair(make_student, teacher, fused_kwargs, plain_kwargs=None, labels=True):
    """Two distillers on identical students: fused and `Distillation`."""
    plain_kwargs = dict(fused_kwargs if plain_kwargs is None else plain_kwargs)
    fused_kwargs = dict(fused_kwargs)
    fused_kwargs.setdefault("chunk_size", 5)
    fused = ksd.Distiller(
        make_student(),
        [
            ksd.terms.FusedDistillation(
                teacher, label_loss=labels, **fused_kwargs
            )
        ],
    )
    fused.compile(optimizer="sgd")
    plain = ksd.Distiller(
        make_student(), [ksd.terms.Distillation(teacher, **plain_kwargs)]
    )
    loss = None
    if labels:
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True,
            reduction=plain_kwargs.get("reduction", "sum_over_batch_size"),
        )
    plain.compile(optimizer="sgd", loss=loss)
    return fused, plain


def _compare_gemma(test, kwargs):
    teacher = _gemma(2, seed=1)
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "recompute"}
    fused, plain = _pair(
        lambda: _gemma(1, seed=2), teacher, kwargs, plain_kwargs
    )
    x, y, weights = _batch()
    _compare(test, fused, plain, x, y, weights)


# The other options on the tied head: the slow tier (the fast tier's CPU
# budget); the forward KL with ξ stays in the fast tier below.
@pytest.mark.slow
class FusedOptionsParityTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("reverse_kl", dict(loss="reverse_kl", temperature=1.5, weight=0.7)),
        ("jsd", dict(loss="jsd", beta=0.3)),
        (
            "mean_reduction",
            dict(loss="kl", reduction="mean_with_sample_weight"),
        ),
        ("dkd", dict(loss="dkd", beta=2.0, temperature=2.0)),
        ("mse", dict(loss="mse")),
        ("standardize", dict(loss="kl", standardize=True, temperature=2.0)),
        ("recompute", dict(loss="jsd", temperature=2.0, recompute=True)),
    )
    def test_gemma_tied_head(self, kwargs):
        _compare_gemma(self, kwargs)


class FusedParityTest(parameterized.TestCase):
    @pytest.mark.slow  # the fast tier's CPU budget
    def test_gemma_tied_head(self):
        _compare_gemma(self, dict(loss="kl", temperature=2.0, xi=0.5))

    def test_label_free(self):
        teacher = _gemma(2, seed=1)
        fused, plain = _pair(
            lambda: _gemma(1, seed=2),
            teacher,
            dict(temperature=2.0),
            labels=False,
        )
        x, y, weights = _batch()
        _compare(self, fused, plain, x, None, weights)

    @pytest.mark.slow  # the fast tier's CPU budget
    def test_untied_keras_hub_head(self):
        teacher = _gemma(1, seed=1)
        fused, plain = _pair(
            lambda: _llama(seed=2), teacher, dict(temperature=2.0)
        )
        x, y, weights = _batch()
        _compare(self, fused, plain, x, y, weights)

    @pytest.mark.slow  # the fast tier's CPU budget
    def test_dense_heads_with_padded_vocabulary(self):
        # The teacher's head has 8 padding rows; both compare the first 40.
        teacher = _dense_lm(seed=1, vocabulary=VOCABULARY + 8)
        kwargs = dict(temperature=2.0, vocabulary_size=VOCABULARY - 8)
        fused, plain = _pair(lambda: _dense_lm(seed=2), teacher, kwargs)
        x, y, weights = _batch(padding=False)
        _compare(self, fused, plain, x, y, weights)

    def test_teacher_targets_read_by_rows(self):
        # An ensemble's mixture is no one head's logits: its dense targets
        # are read a chunk of rows at a time.
        teacher = ksd.teachers.Ensemble([_gemma(1, seed=1), _gemma(1, seed=3)])
        fused, plain = _pair(
            lambda: _gemma(1, seed=2), teacher, dict(temperature=2.0)
        )
        x, y, weights = _batch()
        _compare(self, fused, plain, x, y, weights)

    def test_frozen_head_gets_no_gradient(self):
        def student():
            model = _dense_lm(seed=2)
            model.get_layer("head").trainable = False
            return model

        teacher = _dense_lm(seed=1)
        fused, plain = _pair(student, teacher, dict(temperature=2.0))
        self.assertNotIn(
            "head", str([v.path for v in fused.trainable_variables])
        )
        x, y, weights = _batch(padding=False)
        _compare(self, fused, plain, x, y, weights)


# Whole fits on both ways: the slow tier.
@pytest.mark.slow
class FusedInFitTest(parameterized.TestCase):
    def test_fit_matches_the_unfused_trajectory(self):
        teacher = _gemma(2, seed=1)
        kwargs = dict(temperature=2.0, xi=0.5)
        x, y, weights = _batch(n=8)
        histories = []
        for fused in (True, False):
            keras.utils.set_random_seed(0)
            pair = _pair(lambda: _gemma(1, seed=2), teacher, kwargs)
            distiller = pair[0 if fused else 1]
            distiller.compile(
                optimizer=keras.optimizers.Adam(1e-2),
                loss=None
                if fused
                else keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
            )
            history = distiller.fit(
                x,
                y,
                sample_weight=weights,
                batch_size=4,
                epochs=2,
                shuffle=False,
                verbose=0,
            ).history
            histories.append(
                (
                    history,
                    [
                        keras.ops.convert_to_numpy(v)
                        for v in distiller.student.weights
                    ],
                )
            )
        (fused, fused_weights), (plain, plain_weights) = histories
        term = "fused_distillation_loss"
        np.testing.assert_allclose(
            fused[term], plain["distillation_loss"], rtol=1e-4
        )
        np.testing.assert_allclose(
            fused["supervised_loss"], plain["supervised_loss"], rtol=1e-4
        )
        np.testing.assert_allclose(fused["loss"], plain["loss"], rtol=1e-4)
        for got, want in zip(fused_weights, plain_weights):
            np.testing.assert_allclose(got, want, atol=1e-4)

    def test_ema_teacher_and_config(self):
        term = ksd.terms.FusedDistillation(
            ksd.teachers.EMA(momentum=0.9), label_loss=True, chunk_size=7
        )
        distiller = ksd.Distiller(_dense_lm(seed=2), [term])
        distiller.compile(optimizer="adam")
        x, y, weights = _batch(n=8, padding=False)
        history = distiller.fit(
            x, y, sample_weight=weights, batch_size=4, verbose=0
        ).history
        self.assertIn("supervised_loss", history)
        self.assertTrue(np.isfinite(history["loss"]).all())
        # Evaluation and prediction run the whole student.
        logits = distiller.predict(x, verbose=0)
        self.assertEqual(logits.shape, (8, 9, VOCABULARY))
        config = term.get_config()
        self.assertEqual(
            (config["label_loss"], config["chunk_size"], config["recompute"]),
            (True, 7, False),
        )


class HeadLossTest(parameterized.TestCase):
    """`_fused.head_loss` against the loss of the whole logits."""

    @parameterized.product(recompute=(False, True), transposed=(False, True))
    def test_value_and_gradients(self, recompute, transposed):
        rng = np.random.default_rng(0)
        hidden = rng.normal(size=(37, 8)).astype("float32")
        kernel = rng.normal(size=(8, 50)).astype("float32")
        bias = rng.normal(size=(50,)).astype("float32")
        labels = rng.integers(0, 50, size=(37,)).astype("int32")
        weights = rng.uniform(size=(37, 2)).astype("float32")
        from keras import ops

        def rows(logits, labels):
            log_probs = ops.log_softmax(logits)
            picked = ops.take_along_axis(log_probs, labels[:, None], axis=-1)
            return ops.stack(
                [-picked[:, 0], ops.logsumexp(logits, axis=-1)], -1
            )

        given = kernel.T.copy() if transposed else kernel

        def fused(h, k, b):
            objective, _ = _fused.head_loss(
                rows,
                h,
                k,
                b,
                [labels],
                weights,
                weights,
                transposed=transposed,
                chunk=8,
                recompute=recompute,
            )
            return objective

        def whole(h, k, b):
            return ops.sum(weights * rows(ops.matmul(h, k) + b, labels))

        got, got_gradients = _gradients(fused, hidden, given, bias)
        want, want_gradients = _gradients(whole, hidden, kernel, bias)
        if transposed:
            want_gradients[1] = want_gradients[1].T
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, b in zip(got_gradients, want_gradients):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _gradients(function, *arrays):
    if keras.backend.backend() == "jax":
        import jax

        value, grads = jax.value_and_grad(function, argnums=(0, 1, 2))(*arrays)
        return float(value), [np.asarray(g) for g in grads]
    import tensorflow as tf

    variables = [tf.Variable(a) for a in arrays]
    with tf.GradientTape() as tape:
        value = function(*[v * 1.0 for v in variables])
    return float(value), [g.numpy() for g in tape.gradient(value, variables)]


# Whole fits on both ways: the slow tier.
@pytest.mark.slow
class FusedCachedTest(parameterized.TestCase):
    """Cached targets (dense, top-k, sampled) are read a chunk at a time."""

    @parameterized.named_parameters(
        ("dense", dict(kind="dense"), "kl"),
        ("top_k_jsd", dict(kind="top_k", k=3), "jsd"),
        ("sampled", dict(kind="sampled", k=6), "kl"),
    )
    def test_trains_as_distillation_on_the_cache(self, cache, loss):
        from tests import tiny

        x, y = tiny.data()
        directory = self.create_tempdir().full_path
        ksd.cache.write_teacher_outputs(
            tiny.mlp(seed=5),
            ksd.data.with_sample_ids(x),
            directory,
            num_samples=len(x),
            verbose=0,
            dtype="float32",
            temperature=2.0,
            **cache,
        )
        results = []
        for term_class in (ksd.terms.FusedDistillation, ksd.terms.Distillation):
            teacher = ksd.teachers.Cached(directory)
            kwargs = dict(temperature=2.0, loss=loss, xi=0.5)
            if term_class is ksd.terms.FusedDistillation:
                kwargs.update(label_loss=True, chunk_size=5)
            distiller = ksd.Distiller(
                tiny.mlp(seed=1), [term_class(teacher, **kwargs)]
            )
            distiller.compile(
                optimizer="sgd",
                loss=None
                if term_class is ksd.terms.FusedDistillation
                else tiny.sparse_ce(),
            )
            history = distiller.fit(
                ksd.data.with_sample_ids(x),
                y,
                batch_size=8,
                epochs=2,
                shuffle=False,
                verbose=0,
            ).history
            results.append(
                (
                    history,
                    [
                        keras.ops.convert_to_numpy(v)
                        for v in distiller.student.weights
                    ],
                )
            )
        (fused, fused_weights), (plain, plain_weights) = results
        np.testing.assert_allclose(
            fused["fused_distillation_loss"],
            plain["distillation_loss"],
            rtol=1e-5,
        )
        np.testing.assert_allclose(fused["loss"], plain["loss"], rtol=1e-5)
        for got, want in zip(fused_weights, plain_weights):
            np.testing.assert_allclose(got, want, atol=1e-5)


class FusedBadInputTest(parameterized.TestCase):
    def _functional(self, head, width=12):
        ids = keras.Input((None,), dtype="int32")
        hidden = keras.layers.Embedding(VOCABULARY, width)(ids)
        return keras.Model(ids, head(hidden))

    def test_a_head_that_is_not_a_matrix(self):
        student = self._functional(
            keras.layers.EinsumDense("btd,dv->btv", (None, VOCABULARY))
        )
        with self.assertRaisesRegex(ValueError, "is not a matrix.*EinsumDense"):
            ksd.Distiller(student, [ksd.terms.FusedDistillation(_dense_lm(1))])

    def test_a_head_with_an_activation(self):
        student = self._functional(
            keras.layers.Dense(VOCABULARY, activation="tanh")
        )
        with self.assertRaisesRegex(ValueError, "activation 'tanh'"):
            ksd.Distiller(student, [ksd.terms.FusedDistillation(_dense_lm(1))])

    def test_a_soft_capped_head(self):
        embedding = keras.layers.ReversibleEmbedding(
            VOCABULARY, 12, logit_soft_cap=30.0
        )
        ids = keras.Input((None,), dtype="int32")
        student = keras.Model(ids, embedding(embedding(ids), reverse=True))
        with self.assertRaisesRegex(ValueError, "logit_soft_cap=30.0"):
            ksd.Distiller(student, [ksd.terms.FusedDistillation(_dense_lm(1))])

    def test_a_quantized_head(self):
        student = ksd.pruning.quantize(
            self._functional(keras.layers.Dense(VOCABULARY)), "int8"
        )
        with self.assertRaisesRegex(ValueError, r"is quantized \(int8\)"):
            ksd.Distiller(student, [ksd.terms.FusedDistillation(_dense_lm(1))])

    def test_vocabularies_that_differ(self):
        teacher = _dense_lm(1, vocabulary=VOCABULARY + 2)
        with self.assertRaisesRegex(
            ValueError,
            r"50 classes.*48.*\(None, None, 50\).*\(None, None, 48\)",
        ):
            ksd.Distiller(_dense_lm(2), [ksd.terms.FusedDistillation(teacher)])

    def test_subclassed_student(self):
        class Student(keras.Model):
            def __init__(self):
                super().__init__()
                self.head = keras.layers.Dense(VOCABULARY)

            def call(self, x):
                return self.head(x)

        student = Student()
        student.build((None, 4))
        with self.assertRaisesRegex(ValueError, "subclassed"):
            ksd.Distiller(student, [ksd.terms.FusedDistillation(_dense_lm(1))])

    def test_xi_without_the_label_loss(self):
        with self.assertRaisesRegex(ValueError, "label_loss=True"):
            ksd.terms.FusedDistillation(_dense_lm(1), xi=0.5)

    def test_two_fused_terms(self):
        teacher = _dense_lm(1)
        with self.assertRaisesRegex(ValueError, "At most one term may compute"):
            ksd.Distiller(
                _dense_lm(2),
                [
                    ksd.terms.FusedDistillation(teacher),
                    ksd.terms.FusedDistillation(teacher, name="second"),
                ],
            )

    def test_compiled_loss_or_metrics(self):
        x, y, _ = _batch(padding=False)
        for compiled in (
            dict(loss="sparse_categorical_crossentropy"),
            dict(metrics=["accuracy"]),
        ):
            distiller = ksd.Distiller(
                _dense_lm(2), [ksd.terms.FusedDistillation(_dense_lm(1))]
            )
            distiller.compile(optimizer="sgd", **compiled)
            with self.assertRaisesRegex(
                ValueError, "without `loss` and `metrics`"
            ):
                distiller.fit(x, y, verbose=0)

    def test_float_labels(self):
        x, y, _ = _batch(padding=False)
        distiller = ksd.Distiller(
            _dense_lm(2),
            [ksd.terms.FusedDistillation(_dense_lm(1), label_loss=True)],
        )
        distiller.compile(optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "integer labels"):
            distiller.fit(x, y.astype("float32"), verbose=0)


# Whole fits on both ways: the slow tier.
@pytest.mark.slow
class FusedBatchTermsTest(parameterized.TestCase):
    """Beside the terms that rewrite the batch: on-policy and sequence KD."""

    @parameterized.named_parameters(("on_policy", False), ("sequence_kd", True))
    def test_trains_as_distillation(self, sequence_kd):
        teacher = _dense_lm(seed=1)
        x, y, weights = _batch(n=8, padding=False)
        results = []
        for fused in (True, False):
            if sequence_kd:
                rewrite = ksd.terms.SequenceKD(
                    _dense_lm(seed=3), prompt_length=4
                )
            else:
                rewrite = ksd.terms.OnPolicy(4, temperature=0)
            if fused:
                term = ksd.terms.FusedDistillation(
                    teacher,
                    temperature=2.0,
                    label_loss=sequence_kd,
                    chunk_size=6,
                )
            else:
                term = ksd.terms.Distillation(teacher, temperature=2.0)
            distiller = ksd.Distiller(_dense_lm(seed=2), [term, rewrite])
            loss = None
            if sequence_kd and not fused:
                loss = keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                )
            distiller.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
            history = distiller.fit(
                x,
                y,
                sample_weight=weights,
                batch_size=4,
                epochs=2,
                shuffle=False,
                verbose=0,
            ).history
            weights_after = [
                keras.ops.convert_to_numpy(v) for v in distiller.student.weights
            ]
            results.append((history, weights_after))
        (fused, fused_weights), (plain, plain_weights) = results
        np.testing.assert_allclose(
            fused["loss"], plain["loss"], rtol=1e-4, atol=1e-7
        )
        for got, want in zip(fused_weights, plain_weights):
            np.testing.assert_allclose(got, want, atol=1e-5)


class ProtocolTest(absltest.TestCase):
    def test_computes_output_without_compute_objective_is_refused(self):
        class Headless(ksd.terms.Term):
            computes_output = True

            def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
                return keras.ops.zeros(())

        with self.assertRaisesRegex(
            ValueError, "implement `compute_objective`"
        ):
            ksd.Distiller(_dense_lm(2), [Headless()])

    def test_fit_never_projects_through_a_head_whole(self):
        # Not in the step, nor in `fit`'s first-batch checks: the heads'
        # `[batch, length, vocabulary]` logits are never built.
        student, teacher = _dense_lm(0), _dense_lm(1)
        heads = [student.get_layer("head"), teacher.get_layer("head")]
        calls = []
        for head in heads:

            def counted(*args, _call=head.call, _name=head.name, **kwargs):
                calls.append(_name)
                return _call(*args, **kwargs)

            head.call = counted
        distiller = ksd.Distiller(
            student, [ksd.terms.FusedDistillation(teacher, label_loss=True)]
        )
        distiller.compile(optimizer="sgd")
        x, y, weights = _batch(padding=False)
        distiller.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
        self.assertEqual(calls, [])
