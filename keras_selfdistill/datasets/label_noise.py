import numpy as np


def add_label_noise(labels, rate, num_classes=None, seed=0):
    """Flips a fraction of labels to a different class, chosen uniformly.

    Symmetric label noise for robustness experiments: exactly
    `round(rate · n)` samples, drawn without replacement, get a label drawn
    uniformly from the *other* classes, so `rate` is the fraction of wrong
    labels (the convention of Das & Sanghavi). The same `seed` always
    corrupts the same samples.

    Args:
        labels: 1-D integer array of class indices.
        rate: Fraction of labels to corrupt, in `[0, 1]`.
        num_classes: Number of classes. Defaults to `max(labels) + 1`.
        seed: Seed of the draws. Defaults to `0`.

    Returns:
        A new integer array of the same shape.

    Example:

    ```python
    noisy = keras_selfdistill.datasets.add_label_noise(
        y_train, rate=0.4, seed=1)
    ```
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            "`labels` must be a 1-D array of integer class indices. "
            f"Received: labels with shape {labels.shape} and dtype "
            f"{labels.dtype}"
        )
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"`rate` must be a fraction in [0, 1]. Received: rate={rate!r}"
        )
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if num_classes < 2:
        raise ValueError(
            "Label noise needs at least 2 classes to flip between. "
            f"Received: num_classes={num_classes}"
        )
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = rng.choice(
        len(labels), size=round(rate * len(labels)), replace=False
    )
    offsets = rng.integers(1, num_classes, size=len(flipped))
    noisy[flipped] = (labels[flipped] + offsets) % num_classes
    return noisy
