import os
import socketserver
import threading
import time
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import parameterized

from keras_selfdistill import datasets
from keras_selfdistill.datasets import fashion_mnist
from keras_selfdistill.datasets import sources


class LoadTest(parameterized.TestCase):
    def test_bundled_mnist_is_load_mnist(self):
        (x, y), (xt, _) = datasets.load("bundled_mnist", label_noise=0.2)
        (x2, y2), _ = datasets.load_mnist(label_noise=0.2)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        self.assertEqual(xt.shape, (1000, 28, 28, 1))

    def test_offline_mnist_fails_fast_with_a_hint(self):
        builder = mock.Mock()
        builder.is_prepared.return_value = False
        with (
            mock.patch.object(tfds, "builder", return_value=builder),
            mock.patch.object(tfds, "load") as download,
            mock.patch.object(
                sources, "_DOWNLOAD_URL", "https://192.0.2.1/mnist.gz"
            ),
        ):
            start = time.perf_counter()
            with self.assertRaisesRegex(ConnectionError, "'bundled_mnist'"):
                datasets.load("mnist", timeout=0.5)
            self.assertLess(time.perf_counter() - start, 5.0)
            download.assert_not_called()
            (x, _), _ = datasets.load(
                "mnist", fallback="bundled_mnist", timeout=0.5
            )
        self.assertEqual(x.shape, (4000, 28, 28, 1))

    def test_the_offline_check_goes_through_the_proxy(self):
        # A proxy that records what it is asked and refuses: the check asks
        # it for the download host, as tensorflow-datasets' download would
        # (a raw socket to the host ignored HTTPS_PROXY).
        asked = []

        class Refusing(socketserver.StreamRequestHandler):
            def handle(self):
                asked.append(self.rfile.readline().decode())
                self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")

        with socketserver.TCPServer(("127.0.0.1", 0), Refusing) as proxy:
            thread = threading.Thread(target=proxy.handle_request)
            thread.start()
            address = f"http://127.0.0.1:{proxy.server_address[1]}"
            environment = {
                key: value
                for name, value in (("https_proxy", address), ("no_proxy", ""))
                for key in (name, name.upper())
            }
            with mock.patch.dict(os.environ, environment):
                self.assertFalse(sources._reachable(5.0))
            thread.join(5.0)
        self.assertLen(asked, 1)
        self.assertStartsWith(asked[0], "CONNECT storage.googleapis.com:443")

    def test_missing_fashion_mnist_falls_back(self):
        missing = self.create_tempdir().full_path + "/absent"
        with mock.patch.object(fashion_mnist, "DEFAULT_PATH", missing):
            with self.assertRaisesRegex(FileNotFoundError, "apt-get"):
                datasets.load("fashion_mnist")
            (x, _), _ = datasets.load("fashion_mnist", fallback="bundled_mnist")
        self.assertEqual(len(x), 4000)

    def test_rejects_unknown_names(self):
        with self.assertRaisesRegex(ValueError, "Received: name='cifar10'"):
            datasets.load("cifar10")
        with self.assertRaisesRegex(ValueError, "Received: fallback='x'"):
            datasets.load("mnist", fallback="x")
