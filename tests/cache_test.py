"""The teacher-output cache writer against float64 NumPy."""

import contextlib
import itertools
import json
import os
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny
from tests import watchdog


def _log_softmax(logits):
    logits = np.asarray(logits, "float64")
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _rows(directory, name):
    """Every shard's `name` array, concatenated in id order."""
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    return np.concatenate(
        [
            np.load(os.path.join(directory, f"shard-{s:05d}", f"{name}.npy"))
            for s in range(manifest["num_shards"])
        ]
    )[: manifest["num_samples"]]


def _write(teacher, data, directory, **kwargs):
    kwargs.setdefault("num_samples", 24)
    return ksd.cache.write_teacher_outputs(
        teacher, data, directory, verbose=0, **kwargs
    )


class _Counting(keras.Model):
    """A teacher that counts the Python calls of its `call`: its traces."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return self.inner(x)


class WriterTracingTest(parameterized.TestCase):
    def test_a_short_last_batch_is_padded_not_traced_again(self):
        x, _ = tiny.data()
        calls = {}
        # Batches of 5: four whole ones; then four and a short one of 2.
        for rows in (20, 22):
            teacher = _Counting(tiny.mlp(seed=5))
            directory = self.create_tempdir().full_path
            _write(
                teacher,
                ksd.data.with_sample_ids(x[:rows]),
                directory,
                num_samples=rows,
                batch_size=5,
                temperature=2.0,
            )
            calls[rows] = teacher.calls
            # The padded batch's own rows are the teacher's.
            expected = _log_softmax(
                keras.ops.convert_to_numpy(teacher.inner(x[:rows])) / 2.0
            )
            np.testing.assert_allclose(
                _rows(directory, "log_probs"), expected, atol=2e-3
            )
        self.assertEqual(calls[22], calls[20])


# The writer's files are the backend's teacher outputs written by NumPy;
# `teachers/cached_test` writes and reads them on both backends. These run
# once, in the shorter JAX pass.
@tiny.IN_JAX_PASS
class WriteTeacherOutputsTest(parameterized.TestCase):
    def setUp(self):
        self.x, self.y = tiny.data()
        self.teacher = tiny.mlp(seed=5)
        self.reference = _log_softmax(
            keras.ops.convert_to_numpy(self.teacher(self.x)) / 2.0
        )

    def test_dense_rows_are_the_tempered_log_probabilities(self):
        directory = self.create_tempdir().full_path
        manifest = _write(
            self.teacher,
            ksd.data.with_sample_ids(self.x),
            directory,
            temperature=2.0,
            shard_size=7,
        )
        self.assertTrue(manifest["complete"])
        self.assertEqual((manifest["num_shards"], manifest["k"]), (4, None))
        self.assertEqual(manifest["output_shape"], [3])
        stored = _rows(directory, "log_probs")
        self.assertEqual(stored.dtype, np.float16)
        np.testing.assert_allclose(stored, self.reference, atol=2e-3)
        fingerprints = _rows(directory, "fingerprints")
        np.testing.assert_array_equal(
            fingerprints, ksd.data.with_sample_ids(self.x)["sample_fingerprint"]
        )

    def test_shuffled_batched_dataset_lands_by_id(self):
        directory = self.create_tempdir().full_path
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )
        _write(
            self.teacher,
            data.shuffle(24, seed=1).batch(5),
            directory,
            temperature=2.0,
            dtype="float32",
        )
        np.testing.assert_allclose(
            _rows(directory, "log_probs"), self.reference, atol=1e-5
        )

    def test_top_k_keeps_the_most_likely_and_the_rest_of_the_mass(self):
        teacher = tiny.language_model(seed=1)
        tokens = np.random.default_rng(0).integers(0, 11, (24, 6))
        directory = self.create_tempdir().full_path
        _write(
            teacher,
            ksd.data.with_sample_ids(tokens.astype("int32")),
            directory,
            kind="top_k",
            k=3,
            dtype="float32",
        )
        log_p = _log_softmax(keras.ops.convert_to_numpy(teacher(tokens)))
        ids = _rows(directory, "ids")
        self.assertEqual(ids.shape, (24, 6, 3))
        np.testing.assert_array_equal(ids, np.argsort(-log_p, -1)[..., :3])
        np.testing.assert_allclose(
            _rows(directory, "log_probs"),
            np.take_along_axis(log_p, ids.astype("int64"), -1),
            atol=1e-5,
        )
        top_mass = np.exp(np.take_along_axis(log_p, ids.astype("int64"), -1))
        np.testing.assert_allclose(
            _rows(directory, "rest"),
            np.log(1.0 - top_mass.sum(-1)),
            atol=1e-5,
        )

    def test_sampled_sequences_have_a_distribution_per_position(self):
        teacher = tiny.language_model(seed=1)
        tokens = np.random.default_rng(0).integers(0, 11, (24, 6))
        directory = self.create_tempdir().full_path
        _write(
            teacher,
            ksd.data.with_sample_ids(tokens.astype("int32")),
            directory,
            kind="sampled",
            k=5,
            dtype="float32",
        )
        ids = _rows(directory, "ids").astype("int64")
        weights = _rows(directory, "weights")
        self.assertEqual(ids.shape, (24, 6, 5))
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
        log_p = _log_softmax(keras.ops.convert_to_numpy(teacher(tokens)))
        used = weights > 0
        np.testing.assert_allclose(
            _rows(directory, "log_probs")[used],
            np.take_along_axis(log_p, ids, -1)[used],
            atol=1e-5,
        )

    def test_sampled_weights_estimate_the_distribution(self):
        # RS-KD: the share of k draws is an unbiased estimate of p; with
        # 4,000 draws per sample it is within 4 standard errors of p.
        draws = 4000
        directory = self.create_tempdir().full_path
        _write(
            self.teacher,
            ksd.data.with_sample_ids(self.x),
            directory,
            kind="sampled",
            k=draws,
            temperature=2.0,
            dtype="float32",
        )
        ids = _rows(directory, "ids").astype("int64")
        weights = _rows(directory, "weights")
        log_probs = _rows(directory, "log_probs")
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
        p = np.exp(self.reference)
        estimate = np.zeros_like(p)
        np.add.at(
            estimate,
            (np.arange(24)[:, None].repeat(draws, 1), ids),
            weights,
        )
        error = np.sqrt(p * (1 - p) / draws)
        self.assertLess(np.max(np.abs(estimate - p) / error), 4.0)
        used = weights > 0
        np.testing.assert_allclose(
            log_probs[used],
            np.take_along_axis(self.reference, ids, -1)[used],
            atol=1e-5,
        )
        # Distinct classes, most draws first in id order: never repeated.
        for row, mask in zip(ids, used):
            self.assertLen(set(row[mask]), mask.sum())

    def test_systematic_draws_are_the_floor_or_ceiling_and_unbiased(self):
        # Systematic sampling: k evenly spaced draws from one offset draw a
        # class of probability p ⌊k·p⌋ or ⌈k·p⌉ times, k·p on average.
        draws, copies = 7, 2000
        directory = self.create_tempdir().full_path
        manifest = _write(
            self.teacher,
            ksd.data.with_sample_ids(np.repeat(self.x[:2], copies // 2, 0)),
            directory,
            num_samples=copies,
            kind="sampled",
            k=draws,
            temperature=2.0,
            dtype="float32",
            sampling="systematic",
        )
        self.assertEqual(manifest["sampling"], "systematic")
        ids = _rows(directory, "ids").astype("int64")
        counts = np.zeros((copies, self.reference.shape[-1]))
        np.add.at(
            counts,
            (np.arange(copies)[:, None].repeat(draws, 1), ids),
            _rows(directory, "weights") * draws,
        )
        expected = draws * np.exp(np.repeat(self.reference[:2], copies // 2, 0))
        self.assertTrue(np.all(counts >= np.floor(expected) - 1e-4))
        self.assertTrue(np.all(counts <= np.ceil(expected) + 1e-4))
        # Not always the floor: the offsets differ between ids.
        self.assertGreater(np.mean(counts > np.floor(expected) + 0.5), 0.1)
        # Each count's variance is at most 1/4: the mean over the copies
        # of a row is within 4 standard errors of k·p.
        for row in range(2):
            mean = counts[row * copies // 2 : (row + 1) * copies // 2].mean(0)
            error = 0.5 / np.sqrt(copies // 2)
            self.assertLess(
                np.max(np.abs(mean - expected[row * copies // 2])), 4 * error
            )

    def test_a_restarted_writer_writes_what_an_uninterrupted_one_did(self):
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices(self.x)
        ).batch(4)
        settings = dict(kind="sampled", k=5, shard_size=10, seed=3)
        whole = self.create_tempdir().full_path
        _write(self.teacher, data, whole, **settings)
        stopped = self.create_tempdir().full_path
        # A writer that stops after 3 of 6 batches (its data ran out).
        with self.assertRaisesRegex(ValueError, "held 12 of num_samples"):
            _write(self.teacher, data.take(3), stopped, **settings)
        manifest = json.load(open(os.path.join(stopped, "manifest.json")))
        self.assertFalse(manifest["complete"])
        # Restarted on the data in another order.
        _write(self.teacher, data.shuffle(6, seed=0), stopped, **settings)
        for name in ("ids", "weights", "log_probs", "fingerprints"):
            np.testing.assert_array_equal(
                _rows(stopped, name), _rows(whole, name), err_msg=name
            )
        self.assertEqual(
            json.load(open(os.path.join(stopped, "manifest.json"))),
            json.load(open(os.path.join(whole, "manifest.json"))),
        )

    def test_rows_from_other_batches_equal_to_float32_rounding(self):
        # A float32 forward depends on the batch it runs in: a restart on
        # data batched otherwise keeps the finished rows and computes the
        # others in other company.
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices(self.x)
        )
        whole = self.create_tempdir().full_path
        _write(self.teacher, data.batch(4), whole)
        stopped = self.create_tempdir().full_path
        with self.assertRaisesRegex(ValueError, "held 12 of num_samples"):
            _write(self.teacher, data.batch(4).take(3), stopped)
        _write(self.teacher, data.shuffle(24, seed=1).batch(5), stopped)
        np.testing.assert_array_equal(
            _rows(stopped, "fingerprints"), _rows(whole, "fingerprints")
        )
        np.testing.assert_allclose(
            _rows(stopped, "log_probs"), _rows(whole, "log_probs"), atol=2e-6
        )

    def test_a_cache_of_another_teacher_is_not_continued(self):
        # The same settings, the teacher retrained: its outputs would be
        # mixed with, or hidden by, the old teacher's.
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices(self.x)
        ).batch(4)
        directory = self.create_tempdir().full_path
        _write(self.teacher, data, directory)
        manifest = json.load(open(os.path.join(directory, "manifest.json")))
        self.assertEqual(
            manifest["teacher_fingerprint"],
            ksd.cache.teacher_fingerprint(
                ksd.teachers.FrozenModel(self.teacher)
            ),
        )
        # The same weights in a model built again: the same teacher.
        _write(tiny.mlp(seed=5), data, directory)
        retrained = tiny.mlp(seed=5)
        retrained.set_weights([w + 0.1 for w in retrained.get_weights()])
        with self.assertRaisesRegex(ValueError, "outputs of another teacher"):
            _write(retrained, data, directory)

    def test_progress_bar_counts_the_samples(self):
        import contextlib
        import io

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            ksd.cache.write_teacher_outputs(
                self.teacher,
                ksd.data.with_sample_ids(self.x),
                self.create_tempdir().full_path,
                24,
                batch_size=8,
                verbose=1,
            )
        self.assertIn("24/24", output.getvalue())

    def test_refuses_a_directory_written_with_other_settings(self):
        directory = self.create_tempdir().full_path
        data = ksd.data.with_sample_ids(self.x)
        _write(self.teacher, data, directory)
        with self.assertRaisesRegex(ValueError, r"other settings \(k, kind\)"):
            _write(self.teacher, data, directory, kind="top_k", k=2)

    def test_refuses_bad_arguments(self):
        data = ksd.data.with_sample_ids(self.x)
        directory = self.create_tempdir().full_path
        for kwargs, message in (
            ({"kind": "full"}, "kind='full'"),
            ({"kind": "top_k"}, "k=None"),
            ({"k": 3}, '"dense" keeps every class'),
            ({"num_samples": 0}, "num_samples=0"),
            ({"temperature": 0}, "temperature=0"),
            ({"dtype": "int8"}, "dtype='int8'"),
            ({"num_samples": 10}, r"ids must lie in \[0, num_samples=10\)"),
            ({"sampling": "systematic"}, 'for kind="sampled" only'),
            (
                {"kind": "sampled", "k": 2, "sampling": "stratified"},
                "sampling='stratified'",
            ),
        ):
            with self.assertRaisesRegex(ValueError, message):
                _write(self.teacher, data, directory, **kwargs)
        with self.assertRaisesRegex(ValueError, "with_sample_ids"):
            _write(
                self.teacher,
                tf.data.Dataset.from_tensor_slices(self.x),
                directory,
            )
        with self.assertRaisesRegex(ValueError, "function of the inputs"):
            _write(ksd.teachers.EMA(), data, directory)


class _Killed(BaseException):
    """A kill, raised where the writer would have died."""


@contextlib.contextmanager
def _dying_at(event, log, old_writer=False):
    """Kills the cache writer at its write number `event` (`None`: none).

    Every write is counted and named in `log`: a file's creation (a kill
    leaves it empty; with `old_writer` under its final name, as writers
    before atomic creation did), a rename, the manifest's JSON (a kill
    leaves half of it), each array's write of a row (a kill comes after
    it) and each flush (a kill comes before it).
    """
    counter = itertools.count()

    def hit(kind):
        log.append(kind)
        return next(counter) == event

    open_memmap, replace = np.lib.format.open_memmap, os.replace
    dump, setitem, flush = json.dump, np.memmap.__setitem__, np.memmap.flush

    def creating(path, *args, **kwargs):
        if hit("create"):
            path = path[: -len(".tmp")] if old_writer else path
            open(path, "wb").close()
            raise _Killed
        return open_memmap(path, *args, **kwargs)

    def renaming(source, destination):
        if hit("rename"):
            raise _Killed
        return replace(source, destination)

    def dumping(value, file, **kwargs):
        if hit("manifest"):
            file.write(json.dumps(value)[:20])
            raise _Killed
        return dump(value, file, **kwargs)

    def writing(array, index, value):
        setitem(array, index, value)
        if hit("row"):
            raise _Killed

    def flushing(array):
        if hit("flush"):
            raise _Killed
        return flush(array)

    with (
        mock.patch.object(np.lib.format, "open_memmap", creating),
        mock.patch.object(os, "replace", renaming),
        mock.patch.object(json, "dump", dumping),
        mock.patch.object(np.memmap, "__setitem__", writing),
        mock.patch.object(np.memmap, "flush", flushing),
    ):
        yield


# File handling, the same on both backends: once, in the slow tier (64
# kills and restarts, about 25 s).
@tiny.ONCE
@pytest.mark.slow
class KilledAtEveryWriteTest(parameterized.TestCase):
    def test_a_writer_killed_at_any_write_restarts_to_the_same_cache(self):
        x, _ = tiny.data(n=8)
        data = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices(x)
        ).batch(4)
        teacher = tiny.mlp(seed=5)

        def write(directory):
            ksd.cache.write_teacher_outputs(
                teacher,
                data,
                directory,
                8,
                kind="top_k",
                k=2,
                shard_size=4,
                verbose=0,
            )

        whole, log = self.create_tempdir().full_path, []
        with _dying_at(None, log):
            write(whole)
        # Two shards of four files, each created and renamed; the
        # manifest twice; 8 rows of 4 arrays; the flushes.
        self.assertEqual(log.count("create"), 8)
        self.assertEqual(log.count("rename"), 10)
        self.assertEqual(log.count("manifest"), 2)
        self.assertEqual(log.count("row"), 32)
        self.assertGreater(log.count("flush"), 0)
        kills = [(event, False) for event in range(len(log))]
        kills += [(e, True) for e, kind in enumerate(log) if kind == "create"]
        for event, old_writer in kills:
            where = f"killed at write {event} ({log[event]}, {old_writer})"
            directory = self.create_tempdir().full_path
            with self.assertRaises(_Killed, msg=where):
                with _dying_at(event, [], old_writer):
                    write(directory)
            write(directory)
            for name in ("ids", "log_probs", "rest", "fingerprints"):
                np.testing.assert_array_equal(
                    _rows(directory, name), _rows(whole, name), err_msg=where
                )
            self.assertEqual(
                json.load(open(os.path.join(directory, "manifest.json"))),
                json.load(open(os.path.join(whole, "manifest.json"))),
                where,
            )


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
import tensorflow as tf
import keras_selfdistill as ksd
from keras_selfdistill import cache
from tests import tiny

calls = []
rows_of = cache._rows_of


def dying(*args):
    # SIGKILL in the middle of the run: after 3 of 6 batches were written.
    calls.append(1)
    if len(calls) == 4 and sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return rows_of(*args)


cache._rows_of = dying
x, _ = tiny.data()
data = ksd.data.with_sample_ids(tf.data.Dataset.from_tensor_slices(x))
ksd.cache.write_teacher_outputs(
    tiny.mlp(seed=5, name="teacher"), data.batch(4), sys.argv[1], 24,
    kind="top_k", k=2,
    shard_size=10, verbose=0)
print(len(calls))
"""


# The slow tier: the fast tier's CPU budget (21 s).
@pytest.mark.slow
@tiny.IN_JAX_PASS
class KilledWriterTest(parameterized.TestCase):
    def test_a_killed_writer_restarted_equals_an_uninterrupted_one(self):
        import sys

        def run(directory, mode):
            return watchdog.run(
                [sys.executable, "-c", _KILLED_WRITER, directory, mode],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.dirname(__file__)),
                timeout=300,
            )

        # The uninterrupted cache, written here as the script writes it.
        whole = self.create_tempdir().full_path
        x, _ = tiny.data()
        ksd.cache.write_teacher_outputs(
            tiny.mlp(seed=5, name="teacher"),
            ksd.data.with_sample_ids(
                tf.data.Dataset.from_tensor_slices(x)
            ).batch(4),
            whole,
            24,
            kind="top_k",
            k=2,
            shard_size=10,
            verbose=0,
        )
        killed = self.create_tempdir().full_path
        self.assertEqual(run(killed, "kill").returncode, -9)
        manifest = json.load(open(os.path.join(killed, "manifest.json")))
        self.assertFalse(manifest["complete"])
        restarted = run(killed, "keep")
        self.assertEqual(restarted.returncode, 0, restarted.stderr[-2000:])
        # The restarted writer ran the teacher on the 3 missing batches only.
        self.assertEqual(restarted.stdout.split()[-1], "3")
        for name in ("ids", "log_probs", "rest", "fingerprints"):
            np.testing.assert_array_equal(
                _rows(killed, name), _rows(whole, name), err_msg=name
            )
        self.assertEqual(
            json.load(open(os.path.join(killed, "manifest.json"))),
            json.load(open(os.path.join(whole, "manifest.json"))),
        )
