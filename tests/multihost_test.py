import json
import os
import socket
import sys

import keras
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny
from tests import watchdog

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cluster_env():
    # One CPU device a process: the test's own XLA flags are dropped.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return env


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
class MultiHostTest(absltest.TestCase):
    """Two JAX processes on 127.0.0.1, one device each, with gloo."""

    def test_two_processes_match_one(self):
        if keras.backend.backend() != "jax":
            self.skipTest("runs in the jax suite")
        directory = self.create_tempdir().full_path
        env = _cluster_env()
        port = _free_port()

        def start(process_id, num_processes):
            out = os.path.join(directory, f"{num_processes}_{process_id}.npz")
            command = [sys.executable, "-m", "tests.multihost_run"]
            args = [str(process_id), str(num_processes), str(port), out]
            process = watchdog.popen(
                command + args, env=env, cwd=_ROOT, timeout=300
            )
            return process, out

        workers = [start(0, 2), start(1, 2)]
        for process, _ in workers:
            self.assertEqual(watchdog.wait(process), 0)
        reference, out = start(0, 1)
        self.assertEqual(watchdog.wait(reference), 0)
        first, second, alone = (
            dict(np.load(path, allow_pickle=False))
            for path in (workers[0][1], workers[1][1], out)
        )
        self.assertEqual(int(first["devices"]), 2)
        self.assertEqual(int(alone["devices"]), 1)
        self.assertEqual(sorted(first), sorted(alone))
        self.assertIn("history/pskd_loss", first)
        for key in first:
            if key == "devices":
                continue
            # Both processes end with the same weights, EMA weights and bank.
            np.testing.assert_array_equal(first[key], second[key], key)
            np.testing.assert_allclose(
                first[key], alone[key], rtol=0, atol=1e-5, err_msg=key
            )


@pytest.mark.slow
class MultiHostCacheTest(parameterized.TestCase):
    """The cache writer in two JAX processes writes one process's cache."""

    @parameterized.named_parameters(("dense", "dense"), ("top_k", "top_k"))
    def test_two_writers_write_the_one_process_cache(self, kind):
        if keras.backend.backend() != "jax":
            self.skipTest("runs in the jax suite")
        root = self.create_tempdir().full_path
        env = _cluster_env()
        port = _free_port()

        def start(process_id, num_processes, directory):
            command = [sys.executable, "-m", "tests.multihost_cache_run"]
            args = [process_id, num_processes, port, directory, kind]
            return watchdog.popen(
                command + [str(a) for a in args],
                env=env,
                cwd=_ROOT,
                timeout=300,
            )

        shared, alone = os.path.join(root, "two"), os.path.join(root, "one")
        writers = [start(0, 2, shared), start(1, 2, shared)]
        self.assertEqual([watchdog.wait(w) for w in writers], [0, 0])
        self.assertEqual(watchdog.wait(start(0, 1, alone)), 0)
        # Each process wrote its own shards (0, 2, 4 and 1, 3 of 40 rows
        # by 8); the files and the complete manifest equal one writer's.
        files = sorted(
            os.path.relpath(os.path.join(folder, name), alone)
            for folder, _, names in os.walk(alone)
            for name in names
        )
        self.assertEqual(
            files,
            sorted(
                os.path.relpath(os.path.join(folder, name), shared)
                for folder, _, names in os.walk(shared)
                for name in names
            ),
        )
        self.assertLen([f for f in files if f.endswith("fingerprints.npy")], 5)
        for name in files:
            if name.endswith(".json"):
                with (
                    open(os.path.join(alone, name)) as a,
                    open(os.path.join(shared, name)) as b,
                ):
                    self.assertEqual(json.load(a), json.load(b))
                    continue
            np.testing.assert_array_equal(
                np.load(os.path.join(shared, name)),
                np.load(os.path.join(alone, name)),
                name,
            )
        with open(os.path.join(shared, "manifest.json")) as file:
            self.assertTrue(json.load(file)["complete"])


@pytest.mark.slow
class MultiHostStepsTest(parameterized.TestCase):
    """Two processes whose shards differ by a batch never hang (issue 32)."""

    @parameterized.named_parameters(
        ("uneven", "uneven", "training"),
        ("validation", "validation", "validation"),
        ("steps_per_epoch_given", "steps", None),
    )
    def test_uneven_shards_fail_naming_the_steps(self, case, refused):
        if keras.backend.backend() != "jax":
            self.skipTest("runs in the jax suite")
        directory = self.create_tempdir().full_path
        env = _cluster_env()
        port = _free_port()
        outs = [os.path.join(directory, f"{i}.json") for i in range(2)]
        workers = [
            watchdog.popen(
                [sys.executable, "-m", "tests.multihost_steps_run"]
                + [str(i), str(port), outs[i], case],
                env=env,
                cwd=_ROOT,
                timeout=300,
            )
            for i in range(2)
        ]
        self.assertEqual([watchdog.wait(w) for w in workers], [0, 0])
        results = []
        for out in outs:
            with open(out) as file:
                results.append(json.load(file))
        if refused is None:
            # 2 steps an epoch, 4 in all, fit both shards (5 and 4 batches).
            self.assertLen(results[0]["loss"], 2)
            self.assertEqual(results[0], results[1])
            return
        for result in results:
            self.assertIn(
                f"different numbers of {refused} steps", result["error"]
            )
            self.assertIn("process 0: 5, process 1: 4", result["error"])


@tiny.ONCE
class ShardSizesTest(parameterized.TestCase):
    """The shards' sizes, worked out unread, are those Keras's shards hold."""

    @parameterized.product(rows=[8, 12], samples=[24, 36, 41], processes=[2, 4])
    def test_sizes_match_the_shards_read(self, rows, samples, processes):
        import tensorflow as tf

        source = tf.data.Dataset.from_tensor_slices(np.zeros((samples, 2)))
        pipelines = [
            source.batch(rows),
            ksd.data.with_sample_ids(source.shuffle(samples))
            .batch(rows)
            .map(lambda x: x)
            .prefetch(2),
            source.batch(rows, drop_remainder=True),
        ]
        for dataset in pipelines:
            # As keras.distribution.DataParallel.distribute_dataset shards.
            read = [
                sum(
                    1
                    for _ in dataset.rebatch(rows // processes).shard(
                        processes, i
                    )
                )
                for i in range(processes)
            ]
            self.assertEqual(ksd.checks.shard_sizes(dataset, processes), read)

    def test_sizes_unknown_without_reading_are_none(self):
        import tensorflow as tf

        source = tf.data.Dataset.from_tensor_slices(np.zeros((36, 2)))
        for dataset in (
            source.filter(lambda x: True).batch(8),
            source.batch(8).repeat(2),
            source,
        ):
            self.assertIsNone(ksd.checks.shard_sizes(dataset, 2))


class DistributedEpochsTest(absltest.TestCase):
    """Under a Keras distribution the checked dataset keeps its size."""

    def test_no_ran_out_of_data_warning(self):
        if keras.backend.backend() != "jax":
            self.skipTest("keras.distribution runs on JAX")
        import warnings

        import jax
        import tensorflow as tf

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:1])
        )
        self.addCleanup(keras.distribution.set_distribution, None)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(36, 4)).astype("float32")
        y = rng.integers(0, 3, size=36)
        student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(ksd.teachers.EMA())]
        )
        distiller.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = distiller.fit(data, epochs=2, verbose=0).history
        # The checks' stage re-batches the dataset; without its size
        # restated, Keras warned at the first epoch's end that the input
        # "ran out of data; interrupting training".
        messages = [str(w.message) for w in caught]
        self.assertEmpty([m for m in messages if "ran out of data" in m])
        self.assertLen(history["loss"], 2)

    def test_one_model_replica_over_processes_is_not_refused(self):
        # A replica spanning both processes reads the whole dataset on
        # each (Keras shards by replica), so uneven shards cannot arise.
        if keras.backend.backend() != "jax":
            self.skipTest("keras.distribution runs on JAX")
        import types
        from unittest import mock

        import tensorflow as tf

        data = tf.data.Dataset.range(36).batch(8)
        for replicas, refused in ((1, False), (2, True)):
            distribution = types.SimpleNamespace(
                auto_shard_dataset=True, num_model_replicas=replicas
            )
            with (
                mock.patch("jax.process_count", return_value=2),
                mock.patch.object(
                    keras.distribution, "distribution", lambda: distribution
                ),
            ):
                if refused:
                    with self.assertRaisesRegex(ValueError, "process 0: 5"):
                        ksd.checks.check_process_steps({"x": data})
                else:
                    ksd.checks.check_process_steps({"x": data})
