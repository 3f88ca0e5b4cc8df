"""Sample quality on a classifier's features: FID, KID and class entropy.

FID and KID are defined on the features of an Inception network trained
on ImageNet. Its weights cannot be downloaded on a machine without
network access, and ImageNet features suit 28×28 grey images poorly, so
these functions take any features: the benchmarks use the penultimate
layer of a classifier trained on the same data. Values on other features
are comparable with each other, not with published FIDs.
"""

import numpy as np


def _features(values, name):
    values = np.asarray(values, "float64")
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(
            f"`{name}` must be a 2-D array of at least two feature rows "
            f"`(n, d)`. Received: shape {values.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"`{name}` holds NaN or infinite features. Received: "
            f"{int(np.sum(~np.isfinite(values)))} non-finite values"
        )
    return values


def _same_width(a, b):
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            "Both sets of features must have the same width. Received: "
            f"{a.shape[1]} and {b.shape[1]}"
        )


def frechet_distance(features, reference):
    """The Fréchet distance between Gaussians fitted to two feature sets.

    `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½)`, FID's formula, in float64;
    the trace of the square root is taken from the eigenvalues of the
    symmetric `Σ₁^½ Σ₂ Σ₁^½`, which has the same ones as `Σ₁Σ₂`. Biased
    for small samples: compare values computed from the same number of
    rows.

    Reference:

    - [Heusel et al., 2017](https://arxiv.org/abs/1706.08500)

    Args:
        features: `(n, d)` features of the samples.
        reference: `(m, d)` features of real data.

    Returns:
        A float.

    Example:

    ```python
    fid = keras_selfdistill.diffusion.frechet_distance(
        embed(samples), embed(test_images))
    ```
    """
    a = _features(features, "features")
    b = _features(reference, "reference")
    _same_width(a, b)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sum(np.sqrt(np.clip(product, 0, None)))
    distance = (
        np.sum((mean_a - mean_b) ** 2)
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2.0 * trace_root
    )
    return float(distance)


def kernel_distance(
    features, reference, subset_size=1000, num_subsets=100, seed=0
):
    """The unbiased squared MMD with KID's cubic kernel, over subsets.

    The kernel is `k(a, b) = (a·b / d + 1)³`; each of `num_subsets` draws
    of `subset_size` rows from each set gives an unbiased estimate of
    MMD², and their mean is returned. Unlike FID it is unbiased, so values
    from different numbers of samples compare.

    Reference:

    - [Bińkowski et al., 2018](https://arxiv.org/abs/1801.01401)

    Args:
        features: `(n, d)` features of the samples.
        reference: `(m, d)` features of real data.
        subset_size: Rows per subset, at most `min(n, m)`. Defaults to
            `1000`.
        num_subsets: Number of subsets. Defaults to `100`.
        seed: Seed of the subset draws. Defaults to `0`.

    Returns:
        A float.

    Example:

    ```python
    kid = keras_selfdistill.diffusion.kernel_distance(
        embed(samples), embed(test_images))
    ```
    """
    a = _features(features, "features")
    b = _features(reference, "reference")
    _same_width(a, b)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(
            "`subset_size` must be at least 2. Received: "
            f"subset_size={subset_size}"
        )
    rng = np.random.default_rng(seed)
    width = a.shape[1]
    estimates = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx = (x @ x.T / width + 1) ** 3
        k_yy = (y @ y.T / width + 1) ** 3
        k_xy = (x @ y.T / width + 1) ** 3
        off_diagonal = size * (size - 1)
        estimates.append(
            (k_xx.sum() - np.trace(k_xx)) / off_diagonal
            + (k_yy.sum() - np.trace(k_yy)) / off_diagonal
            - 2 * k_xy.mean()
        )
    return float(np.mean(estimates))


def class_entropy(logits):
    """The entropy, in nats, of the samples' predicted classes.

    The classes are the argmax of a classifier's `(n, classes)` outputs;
    the entropy is that of their histogram. A sampler that collapses onto
    a few classes scores low; `log(classes)` is the most, reached when
    every class is predicted equally often (balanced data).

    Example:

    ```python
    entropy = keras_selfdistill.diffusion.class_entropy(
        classifier.predict(samples))
    ```
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(
            f"`logits` must be `(n, classes)`. Received: shape {logits.shape}"
        )
    counts = np.bincount(np.argmax(logits, -1), minlength=logits.shape[1])
    shares = counts[counts > 0] / counts.sum()
    return float(-np.sum(shares * np.log(shares)))
