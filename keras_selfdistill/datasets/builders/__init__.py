"""tensorflow-datasets builders for the data that needs no download.

Importing this module registers them with `tfds`:

```python
import tensorflow_datasets as tfds
import keras_selfdistill.datasets.builders  # noqa: F401 (registers them)

ds, info = tfds.load("bundled_mnist", split="train", as_supervised=True,
                     with_info=True)
```

- `bundled_mnist`: the 5,000 MNIST digits that ship with the package
  (4,000 train / 1,000 test, the split of `load_mnist`).
- `bundled_digits`: the 1,797 UCI 8×8 digits that ship with the package
  (1,347 / 450, the split of `load_digits`; pixel values 0–16).
- `local_fashion_mnist`: the full Fashion-MNIST (60,000 / 10,000) from
  Debian's `dataset-fashion-mnist` or a folder given as the manual
  directory.
"""

from keras_selfdistill.datasets.builders.bundled_digits import BundledDigits
from keras_selfdistill.datasets.builders.bundled_mnist import BundledMnist
from keras_selfdistill.datasets.builders.local_fashion_mnist import (
    LocalFashionMnist,
)

__all__ = ["BundledDigits", "BundledMnist", "LocalFashionMnist"]
