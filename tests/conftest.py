import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# absl's TestCase helpers (create_tempdir) read flags that pytest never
# parses.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # Without the garbage collection Keras runs by default: a full
    # collection before every test was half of the suite's time, and the
    # collector still runs on its own (peak memory stays under 5 GB).
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
