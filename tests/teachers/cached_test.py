import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _cache(test, teacher, x, **kwargs):
    directory = test.create_tempdir().full_path
    kwargs.setdefault("dtype", "float32")
    ksd.cache.write_teacher_outputs(
        teacher,
        ksd.data.with_sample_ids(x),
        directory,
        num_samples=len(x),
        verbose=0,
        **kwargs,
    )
    return directory


def _fit(teacher, x, y, epochs=2, dataset=False, **term_kwargs):
    """The distiller and History after SGD with Distillation(teacher), from
    NumPy arrays or (`dataset`) the same batches from `tf.data`."""
    term_kwargs.setdefault("temperature", 2.0)
    term_kwargs.setdefault("xi", 0.5)
    distiller = ksd.Distiller(
        tiny.mlp(seed=1), [ksd.terms.Distillation(teacher, **term_kwargs)]
    )
    distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
    data = (ksd.data.with_sample_ids(x), y)
    if dataset:
        data = (tf.data.Dataset.from_tensor_slices(data).batch(8),)
    history = distiller.fit(
        *data,
        batch_size=None if dataset else 8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    ).history
    return distiller, history


@keras.saving.register_keras_serializable(package="cached_test")
def _noise(x, seed):
    """A stateless augmentation: Gaussian noise seeded per view."""
    noise = tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)
    return x + 0.5 * noise


def _other_noise(x, seed):
    noise = tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)
    return x - 0.5 * noise


def _view(x, sample_id, view, views, seed=0):
    """Sample `sample_id`'s view in NumPy terms: the writer's seeds."""
    seeds = tf.constant([seed, sample_id * views + view], "int64")
    return _noise(tf.constant(x), seeds).numpy()


class ViewsTest(parameterized.TestCase):
    """Caches of augmented views, replayed in the input pipeline."""

    def setUp(self):
        self.x, self.y = tiny.data()
        self.teacher = tiny.mlp(seed=5)

    def test_writer_stores_each_view_of_each_sample(self):
        directory = _cache(self, self.teacher, self.x, augment=_noise, views=3)
        stored = np.load(f"{directory}/shard-00000/log_probs.npy")
        self.assertEqual(stored.shape, (24, 3, 3))
        for sample_id in (0, 7, 23):
            for view in range(3):
                augmented = _view(self.x[sample_id], sample_id, view, 3)
                logits = self.teacher.predict(augmented[None], verbose=0)
                expected = keras.ops.convert_to_numpy(
                    keras.ops.log_softmax(logits)
                )[0]
                np.testing.assert_allclose(
                    stored[sample_id, view], expected, atol=1e-5
                )
        # The views differ: each has its own seed.
        self.assertGreater(np.abs(stored[:, 0] - stored[:, 1]).max(), 1e-3)

    def test_join_replays_the_view_of_each_epoch(self):
        directory = _cache(self, self.teacher, self.x, augment=_noise, views=3)
        teacher = ksd.teachers.Cached(directory, augment=_noise)
        stored = np.load(f"{directory}/shard-00000/log_probs.npy")
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )
        for batched in (True, False):
            pipeline = data.shuffle(24, seed=1)
            if batched:
                pipeline = pipeline.batch(5)
            joined = ksd.teachers.cached.join([teacher], pipeline)
            for epoch in (0, 1, 4):
                teacher.on_epoch_begin(epoch)
                seen = 0
                for features, _ in joined.as_numpy_iterator():
                    ids = np.reshape(features["sample_id"], -1)
                    inputs = np.reshape(features["inputs"], (-1, 4))
                    rows = features["teacher_outputs"][teacher.name][0]
                    rows = np.reshape(rows, (-1, 3))
                    for sample_id, given, row in zip(ids, inputs, rows):
                        view = (sample_id + epoch) % 3
                        np.testing.assert_allclose(
                            given,
                            _view(self.x[sample_id], sample_id, view, 3),
                            atol=1e-6,
                        )
                        np.testing.assert_array_equal(
                            row, stored[sample_id, view]
                        )
                        seen += 1
                self.assertEqual(seen, 24)

    def test_fit_equals_the_live_teacher_on_the_same_views(self):
        # One view: the same augmentation every epoch, which a live
        # teacher sees when the pipeline applies it.
        directory = _cache(self, self.teacher, self.x, augment=_noise, views=1)
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        ).batch(8)
        augmented = data.map(
            lambda x, y: (
                ksd.cache.view_inputs(x, _noise, 0, 1, 0, batched=True),
                y,
            )
        )

        def fit(teacher, dataset):
            distiller = ksd.Distiller(
                tiny.mlp(seed=1),
                [ksd.terms.Distillation(teacher, temperature=2.0, xi=0.5)],
            )
            distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
            history = distiller.fit(dataset, epochs=2, verbose=0).history
            return distiller.student.get_weights(), history

        cached_weights, cached = fit(
            ksd.teachers.Cached(directory, augment=_noise), data
        )
        live_weights, live = fit(self.teacher, augmented)
        np.testing.assert_allclose(
            cached["distillation_loss"], live["distillation_loss"], rtol=1e-5
        )
        for a, b in zip(cached_weights, live_weights):
            np.testing.assert_allclose(a, b, atol=1e-6)

    def test_fit_moves_to_the_next_view_each_epoch(self):
        directory = _cache(self, self.teacher, self.x, augment=_noise, views=2)
        teacher = ksd.teachers.Cached(directory, augment=_noise)
        distiller = ksd.Distiller(
            tiny.mlp(seed=1), [ksd.terms.Distillation(teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        ).batch(8)
        history = distiller.fit(data, epochs=3, verbose=0).history
        self.assertTrue(np.isfinite(history["distillation_loss"]).all())
        self.assertEqual(int(teacher._epoch_variable().numpy()), 2)
        restored = ksd.teachers.Cached.from_config(teacher.get_config())
        self.assertIs(restored.augment, _noise)

    @tiny.IN_JAX_PASS
    def test_refusals(self):
        samples = ksd.data.with_sample_ids(self.x)
        for kwargs, error, message in (
            ({"augment": _noise}, ValueError, "both `augment`"),
            ({"views": 2}, ValueError, "both `augment`"),
            ({"augment": _noise, "views": 0}, ValueError, "`views` must"),
            ({"augment": "flip", "views": 2}, TypeError, "must be a func"),
        ):
            with self.assertRaisesRegex(error, message):
                ksd.cache.write_teacher_outputs(
                    self.teacher,
                    samples,
                    self.create_tempdir().full_path,
                    24,
                    verbose=0,
                    **kwargs,
                )
        plain = _cache(self, self.teacher, self.x)
        viewed = _cache(self, self.teacher, self.x, augment=_noise, views=2)
        for directory, augment, message in (
            (plain, _noise, "without augmentation"),
            (viewed, None, "with 2 views of the augmentation"),
            (viewed, _other_noise, "Received: augment='tests"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                ksd.teachers.Cached(directory, augment=augment)
        teacher = ksd.teachers.Cached(viewed, augment=_noise)
        distiller = ksd.Distiller(
            tiny.mlp(seed=1), [ksd.terms.Distillation(teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        with self.assertRaisesRegex(ValueError, "as a `tf.data.Dataset`"):
            distiller.fit(samples, self.y, epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, "only cached teacher"):
            ksd.teachers.cached.join(
                [teacher, ksd.teachers.Cached(plain, name="plain")], samples
            )


class CachedTest(parameterized.TestCase):
    def setUp(self):
        self.x, self.y = tiny.data()
        self.teacher = tiny.mlp(seed=5)

    def _weights(self, distiller):
        return [np.asarray(w) for w in distiller.student.get_weights()]

    def test_users_steps_per_epoch_and_initial_epoch(self):
        # A repeated dataset read for the user's own steps an epoch, from
        # a later epoch (once seen to hang): 3 epochs of 2 steps, as the
        # live teacher trains on the same batches.
        directory = _cache(self, self.teacher, self.x)
        runs = []
        for teacher in (self.teacher, ksd.teachers.Cached(directory)):
            # Unshuffled: the rows each step reads are then the same.
            data = tf.data.Dataset.from_tensor_slices(
                (ksd.data.with_sample_ids(self.x), self.y)
            )
            data = data.batch(8).repeat()
            distiller = ksd.Distiller(
                tiny.mlp(seed=1),
                [ksd.terms.Distillation(teacher, temperature=2.0, xi=0.5)],
            )
            distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
            history = distiller.fit(
                data, epochs=4, initial_epoch=1, steps_per_epoch=2, verbose=0
            ).history
            self.assertLen(history["loss"], 3)
            self.assertEqual(int(distiller.optimizer.iterations), 6)
            runs.append(history["loss"])
        np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)

    @parameterized.named_parameters(
        ("kl", "kl"),
        ("reverse_kl", "reverse_kl"),
        ("jsd", "jsd"),
        ("dkd", "dkd"),
    )
    def test_dense_cache_trains_as_the_live_teacher(self, loss):
        directory = _cache(self, self.teacher, self.x)
        beta = {"jsd": 0.3, "dkd": 2.0}.get(loss)
        live, live_history = _fit(
            self.teacher, self.x, self.y, loss=loss, beta=beta
        )
        # NumPy inputs get their rows joined, a dataset's step gathers them.
        for dataset in (False, True):
            cached, history = _fit(
                ksd.teachers.Cached(directory),
                self.x,
                self.y,
                dataset=dataset,
                loss=loss,
                beta=beta,
            )
            np.testing.assert_allclose(
                history["distillation_loss"],
                live_history["distillation_loss"],
                rtol=1e-5,
            )
            for a, b in zip(self._weights(cached), self._weights(live)):
                np.testing.assert_allclose(a, b, atol=1e-6)

    def test_numpy_inputs_lose_their_ids_unless_a_bank_reads_them(self):
        # Joined NumPy inputs carry the cache rows: the ids and fingerprints
        # are dropped (fewer arrays to slice per batch) unless another
        # teacher reads ids in the step, as a prediction bank does.
        directory = _cache(self, self.teacher, self.x)
        samples = ksd.data.with_sample_ids(self.x)
        teacher = ksd.teachers.Cached(directory)
        for keep_ids, keys in (
            (False, ["inputs"]),
            (True, ["inputs", "sample_fingerprint", "sample_id"]),
        ):
            joined = ksd.teachers.cached.join(
                [teacher], samples, None, keep_ids
            )
            self.assertEqual(sorted(joined), sorted(keys + ["teacher_outputs"]))
        bank = ksd.teachers.PastPredictions(len(self.x), 3)
        distiller = ksd.Distiller(
            tiny.mlp(seed=1),
            [
                ksd.terms.Distillation(ksd.teachers.Cached(directory)),
                ksd.terms.Distillation(bank, xi=0.5, name="self"),
            ],
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        history = distiller.fit(samples, self.y, batch_size=8, epochs=2)
        self.assertEqual(len(history.history["self_loss"]), 2)
        # The bank's second epoch had targets: the ids reached the step.
        self.assertGreater(history.history["self_loss"][1], 0.0)

    def test_ensembles_write_and_read_dense_caches(self):
        # An ensemble's cache trains as the live ensemble, and a cached
        # member trains as the live member inside an ensemble.
        other = tiny.mlp(seed=6)

        def ensemble(first):
            return ksd.teachers.Ensemble([first, other], weights=[0.3, 0.7])

        live, _ = _fit(ensemble(self.teacher), self.x, self.y)
        # A mixture is cached at the term's temperature; one model at any.
        whole = _cache(self, ensemble(self.teacher), self.x, temperature=2.0)
        member = _cache(self, self.teacher, self.x, temperature=3.0)
        for teacher, dataset in (
            (ksd.teachers.Cached(whole), False),
            (ensemble(ksd.teachers.Cached(member)), False),
            (ensemble(ksd.teachers.Cached(member)), True),
        ):
            cached, _ = _fit(teacher, self.x, self.y, dataset=dataset)
            for a, b in zip(self._weights(cached), self._weights(live)):
                np.testing.assert_allclose(a, b, atol=1e-5)
        with self.assertRaisesRegex(ValueError, "cannot be re-tempered"):
            _fit(ksd.teachers.Cached(whole), self.x, self.y, temperature=1.0)
        # The kinds: one model's cache is logits, a mixture's is its
        # log-probabilities at the written temperature, which the term's
        # temperature stays equal to (a callback cannot move it).
        self.assertEqual(ksd.teachers.Cached(member).target_kind, "logits")
        mixture = ksd.teachers.Cached(whole)
        self.assertEqual(mixture.target_kind, "log_probs")
        term = ksd.terms.Distillation(mixture, temperature=2.0)
        term.temperature = 2.0
        with self.assertRaisesRegex(ValueError, "must stay that number"):
            term.temperature = 4.0
        self.assertEqual(term.temperature, 2.0)

    def test_top_k_with_every_class_trains_as_the_live_teacher(self):
        directory = _cache(
            self, self.teacher, self.x, kind="top_k", k=3, temperature=2.0
        )
        live, _ = _fit(self.teacher, self.x, self.y)
        cached, _ = _fit(ksd.teachers.Cached(directory), self.x, self.y)
        for a, b in zip(self._weights(cached), self._weights(live)):
            np.testing.assert_allclose(a, b, atol=1e-5)

    @parameterized.named_parameters(
        ("top_k", "top_k", 2), ("sampled", "sampled", 6)
    )
    def test_sparse_loss_value_matches_numpy(self, kind, k):
        directory = _cache(
            self, self.teacher, self.x, kind=kind, k=k, temperature=2.0
        )
        teacher = ksd.teachers.Cached(directory)
        distiller, history = _fit(teacher, self.x, self.y, epochs=1)
        # At a zero learning rate the logged term is the mean over the
        # samples of the per-sample loss of the student's logits.
        distiller.optimizer.learning_rate.assign(0.0)
        history = distiller.fit(
            ksd.data.with_sample_ids(self.x),
            self.y,
            batch_size=24,
            epochs=1,
            verbose=0,
        ).history
        s = distiller.student.predict(self.x, verbose=0).astype("float64")
        log_q = s / 2.0 - np.log(np.exp(s / 2.0).sum(-1, keepdims=True))
        rows = teacher.rows(
            np.arange(24),
            ksd.data.with_sample_ids(self.x)["sample_fingerprint"],
        )
        if kind == "top_k":
            ids, log_p, rest = rows
            q = np.exp(np.take_along_axis(log_q, ids.astype(int), -1))
            q = np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)
            p = np.exp(np.concatenate([log_p, rest[:, None]], -1))
            p /= p.sum(-1, keepdims=True)
            per_sample = (p * np.log(p / q)).sum(-1)
        else:
            ids, weights, log_p = rows
            q = np.take_along_axis(log_q, ids.astype(int), -1)
            per_sample = (weights * (log_p - q)).sum(-1)
        self.assertAlmostEqual(
            history["distillation_loss"][0], 4.0 * per_sample.mean(), places=4
        )

    # Input-pipeline behaviour, the same on both backends.
    @tiny.IN_JAX_PASS
    def test_shuffled_batched_dataset(self):
        directory = _cache(self, self.teacher, self.x)
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )
        distiller = ksd.Distiller(
            tiny.mlp(seed=1),
            [ksd.terms.Distillation(ksd.teachers.Cached(directory))],
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        history = distiller.fit(
            data.shuffle(24, seed=0).batch(5), epochs=2, verbose=0
        ).history
        self.assertTrue(np.isfinite(history["distillation_loss"]).all())

    def test_random_augmentation_after_the_ids_is_refused(self):
        directory = _cache(self, self.teacher, self.x)
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )

        def augment(x, y):
            noise = tf.random.normal(tf.shape(x["inputs"]))
            return dict(x, inputs=x["inputs"] + noise), y

        distiller = ksd.Distiller(
            tiny.mlp(seed=1),
            [ksd.terms.Distillation(ksd.teachers.Cached(directory))],
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        with self.assertRaisesRegex(
            ValueError, "differ from those the teacher's outputs were written"
        ):
            distiller.fit(data.map(augment).batch(8), epochs=1, verbose=0)

    # Input-pipeline behaviour, the same on both backends.
    @tiny.IN_JAX_PASS
    def test_refusals(self):
        directory = _cache(
            self, self.teacher, self.x, kind="sampled", k=4, temperature=2.0
        )
        for kwargs, message in (
            ({"loss": "reverse_kl"}, r"support loss in \('kl',\)"),
            ({"temperature": 1.0}, "written at temperature 2.0"),
            ({"standardize": True}, "`standardize`"),
        ):
            kwargs.setdefault("temperature", 2.0)
            with self.assertRaisesRegex(ValueError, message):
                ksd.Distiller(
                    tiny.mlp(),
                    [
                        ksd.terms.Distillation(
                            ksd.teachers.Cached(directory), **kwargs
                        )
                    ],
                )
        with self.assertRaisesRegex(ValueError, "compares raw logits"):
            ksd.Distiller(
                tiny.mlp(),
                [
                    ksd.terms.Distillation(
                        ksd.teachers.Cached(_cache(self, self.teacher, self.x)),
                        loss="mse",
                    )
                ],
            )
        with self.assertRaisesRegex(ValueError, "inside an Ensemble"):
            ksd.Distiller(
                tiny.mlp(),
                [
                    ksd.terms.Distillation(
                        ksd.teachers.Ensemble(
                            [ksd.teachers.Cached(directory), self.teacher]
                        ),
                        temperature=2.0,
                    )
                ],
            )
        with self.assertRaisesRegex(FileNotFoundError, "no manifest.json"):
            ksd.teachers.Cached(self.create_tempdir().full_path)
        distiller = ksd.Distiller(
            tiny.mlp(),
            [
                ksd.terms.Distillation(
                    ksd.teachers.Cached(directory), temperature=2.0
                )
            ],
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        with self.assertRaisesRegex(ValueError, "with_sample_ids"):
            distiller.fit(self.x, self.y, verbose=0)

    # Input-pipeline behaviour, the same on both backends.
    @tiny.IN_JAX_PASS
    def test_incomplete_cache_is_refused(self):
        directory = self.create_tempdir().full_path
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices(self.x)
        ).batch(8)
        with self.assertRaisesRegex(ValueError, "held 8 of"):
            ksd.cache.write_teacher_outputs(
                self.teacher, data.take(1), directory, 24, verbose=0
            )
        with self.assertRaisesRegex(ValueError, "incomplete"):
            ksd.teachers.Cached(directory)

    # Input-pipeline behaviour, the same on both backends.
    @tiny.IN_JAX_PASS
    def test_saved_distiller_reads_the_same_cache(self):
        directory = _cache(self, self.teacher, self.x)
        distiller, _ = _fit(ksd.teachers.Cached(directory), self.x, self.y)
        path = self.create_tempdir().full_path + "/d.keras"
        distiller.save(path)
        restored = keras.saving.load_model(path)
        self.assertEqual(restored.terms[0].teacher.directory, directory)
        restored.fit(
            ksd.data.with_sample_ids(self.x), self.y, epochs=1, verbose=0
        )

    # Input-pipeline behaviour, the same on both backends.
    @tiny.IN_JAX_PASS
    def test_tfds_split_with_shuffled_files(self):
        # Ids keyed by tfds record: a cache written from one shuffled read
        # serves another (a misaligned id would fail the inputs' check).
        import tensorflow_datasets as tfds

        from tests.data_test import _FourShards

        builder = _FourShards(data_dir=self.create_tempdir().full_path)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=4)
        )

        def split():
            dataset = builder.as_dataset(
                split="train",
                shuffle_files=True,
                read_config=tfds.ReadConfig(add_tfds_id=True),
            )
            return ksd.data.with_sample_ids(dataset, builder.info, "train")

        directory = self.create_tempdir().full_path
        ksd.cache.write_teacher_outputs(
            self.teacher, split(), directory, 64, batch_size=16, verbose=0
        )
        distiller = ksd.Distiller(
            tiny.mlp(seed=1),
            [ksd.terms.Distillation(ksd.teachers.Cached(directory))],
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        history = distiller.fit(
            split().shuffle(64).batch(8), epochs=2, verbose=0
        ).history
        self.assertTrue(np.isfinite(history["distillation_loss"]).all())

    # The step's gather differs by backend (a variable, a constant).
    def test_memory_and_memory_map_paths_and_one_check_per_dataset(self):
        from unittest import mock

        from keras_selfdistill.teachers import _cached_join as cached_module

        directory = _cache(self, self.teacher, self.x)
        dataset = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        ).batch(8)
        weights = []
        default = ksd.teachers.Cached.IN_MEMORY_BYTES
        # Gathered in the step; in the pipeline from memory (JAX, over its
        # constant limit); in the pipeline from the memory map.
        for limit, in_step in ((default, True), (default, False), (0, False)):
            if (
                keras.backend.backend() == "tensorflow"
                and limit
                and not in_step
            ):
                continue
            teacher = ksd.teachers.Cached(directory)
            teacher.IN_MEMORY_BYTES = limit
            if not in_step:
                teacher.JAX_STEP_BYTES = 0
            distiller = ksd.Distiller(
                tiny.mlp(seed=1), [ksd.terms.Distillation(teacher)]
            )
            distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
            hashed = []
            original = cached_module.fingerprints_of
            with mock.patch.object(
                cached_module,
                "fingerprints_of",
                side_effect=lambda *a: hashed.append(1) or original(*a),
            ):
                for fit in ("first", "same dataset", "another dataset"):
                    count = len(hashed)
                    data = (
                        dataset
                        if fit != "another dataset"
                        else (dataset.map(lambda x, y: (x, y)))
                    )
                    distiller.fit(data, epochs=2, verbose=0)
                    # The check is traced into the pipeline only while some
                    # sample of this dataset object is unchecked.
                    self.assertEqual(
                        len(hashed) > count, fit != "same dataset", fit
                    )
            self.assertEqual(teacher._in_memory_arrays() is None, limit == 0)
            self.assertEqual(teacher.step_table() is not None, in_step)
            weights.append(self._weights(distiller))
        for other in weights[1:]:
            for a, b in zip(weights[0], other):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    def test_the_step_gathers_the_rows_and_the_first_pass_is_checked(self):
        from unittest import mock

        directory = _cache(self, self.teacher, self.x)
        teacher = ksd.teachers.Cached(directory)
        dataset = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )
        dataset = dataset.shuffle(24, seed=0).batch(8)
        distiller = ksd.Distiller(
            tiny.mlp(seed=1), [ksd.terms.Distillation(teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        calls = []
        verify, unverified = teacher.verify, teacher.unverified
        with (
            mock.patch.object(
                teacher,
                "verify",
                side_effect=lambda *a: calls.append("verify") or verify(*a),
            ),
            mock.patch.object(
                teacher,
                "unverified",
                side_effect=lambda *a: calls.append("cond") or unverified(*a),
            ),
        ):
            # Built first: JAX's trainer builds from a batch of an iterator
            # of its own, which prefetches (and hashes) further batches.
            distiller.fit(dataset.take(1), verbose=0)
            calls.clear()
            _, given = tiny.fit_arguments(distiller, dataset, epochs=3)
            # Each batch of the first pass hashed, later passes not even
            # asked about.
            self.assertEqual(calls, ["verify"] * 3)
            _, again = tiny.fit_arguments(distiller, dataset, epochs=3)
            self.assertEqual(calls, ["verify"] * 3)
        # No rows in the pipeline: the step gathers them by id.
        self.assertNotIn(ksd.batch.TEACHER_OUTPUTS, given["x"].element_spec[0])
        self.assertEqual(given["steps_per_epoch"], 3)
        # Each epoch is one pass over the samples, reshuffled.
        ids = [
            np.asarray(features[ksd.batch.SAMPLE_ID])
            for features, _ in given["x"].take(9)
        ]
        epochs = [np.concatenate(ids[i : i + 3]) for i in (0, 3, 6)]
        for epoch in epochs:
            np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
        self.assertFalse(np.array_equal(epochs[1], epochs[2]))
        # The second fit's first pass runs the input checks alone.
        self.assertEqual(again["steps_per_epoch"], 3)
        distiller.check_data = False
        _, unchecked = tiny.fit_arguments(distiller, dataset, epochs=3)
        self.assertIs(unchecked["x"], dataset)
        self.assertIsNone(unchecked.get("steps_per_epoch"))

    # Input-pipeline behaviour, the same on both backends.
    @tiny.IN_JAX_PASS
    def test_repeated_ids_are_read_alike(self):
        # Oversampling: a cache is only read, so an id may repeat (a bank,
        # which writes a row per id, refuses it).
        directory = _cache(self, self.teacher, self.x)
        ids = ksd.data.with_sample_ids(self.x)
        twice = {key: np.concatenate([v, v]) for key, v in ids.items()}
        distiller = ksd.Distiller(
            tiny.mlp(seed=1),
            [ksd.terms.Distillation(ksd.teachers.Cached(directory))],
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        for data in (
            (twice, np.concatenate([self.y, self.y])),
            (
                tf.data.Dataset.from_tensor_slices(
                    (twice, np.concatenate([self.y, self.y]))
                ).batch(48),
            ),
        ):
            history = distiller.fit(*data, epochs=1, verbose=0).history
            self.assertTrue(np.isfinite(history["distillation_loss"]).all())

    def test_refused_beside_generated_batches_and_in_consistency(self):
        # A cache holds targets of the dataset's inputs, joined before the
        # step: batches replaced in the step, or whole-distribution terms
        # given sparse targets, would read the wrong targets.
        directory = _cache(
            self, self.teacher, self.x, kind="top_k", k=2, temperature=2.0
        )
        with self.assertRaisesRegex(ValueError, "replaces the training batch"):
            ksd.Distiller(
                tiny.language_model(),
                [
                    ksd.terms.Distillation(
                        ksd.teachers.Cached(_cache(self, self.teacher, self.x))
                    ),
                    ksd.terms.OnPolicy(2),
                ],
            )
        with self.assertRaisesRegex(ValueError, "holds top_k targets"):
            ksd.Distiller(
                tiny.mlp(),
                [
                    ksd.terms.Consistency(
                        keras.layers.Identity(),
                        teacher=ksd.teachers.Cached(directory),
                    )
                ],
            )
