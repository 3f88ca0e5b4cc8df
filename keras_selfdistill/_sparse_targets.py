"""Sparse targets of a distribution: its top k, and RS-KD's draws.

What `keras_selfdistill.cache.write_teacher_outputs` stores for
`kind="top_k"` and `kind="sampled"`, in NumPy.

Reference:

- [Anshumann et al., 2025](https://arxiv.org/abs/2503.16870) (RS-KD,
  Sparse Logit Sampling)
"""

import numpy as np


def top_k(log_probs, k):
    """The k most likely classes, most likely first, and the rest's log."""
    top = np.argpartition(-log_probs, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(log_probs, top, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    top = np.take_along_axis(top, order, axis=-1)
    values = np.take_along_axis(values, order, axis=-1)
    outside = log_probs.copy()
    np.put_along_axis(outside, top, -np.inf, axis=-1)
    peak = outside.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        rest = np.log(np.exp(outside - peak).sum(axis=-1)) + peak[..., 0]
    return top, values, rest


def sample(log_probs, draws, seed, sample_ids, sampling="multinomial"):
    """RS-KD's sparse targets: `draws` classes drawn from the teacher.

    Each sample's draws come from its own generator, seeded by `seed` and
    its id, so a restarted writer draws what an uninterrupted one did.
    `"multinomial"` draws are independent (RS-KD's); `"systematic"` ones
    are the points `(u + j) / draws`, `j = 0 … draws − 1`, of one uniform
    `u` per position through the cumulative distribution, so a class of
    probability `p` is drawn `⌊draws·p⌋` or `⌈draws·p⌉` times, `draws·p`
    in expectation. Returns the distinct classes (padded with class 0 at
    weight 0), their share of the draws and their log-probabilities.
    """
    shape = log_probs.shape
    rows = log_probs.reshape(-1, shape[-1])
    per_sample = rows.shape[0] // shape[0]
    width = 1 if sampling == "systematic" else draws
    uniforms = np.concatenate(
        [
            np.random.default_rng([seed, int(i)]).random((per_sample, width))
            for i in sample_ids
        ]
    )
    if sampling == "systematic":
        uniforms = (uniforms + np.arange(draws)) / draws
    cumulative = np.cumsum(np.exp(rows), axis=-1)
    cumulative /= cumulative[:, -1:]
    # One sorted array for all rows: row r's values lie in [r, r + 1].
    offsets = np.arange(rows.shape[0])[:, None]
    flat = (cumulative + offsets).ravel()
    drawn = np.searchsorted(flat, (uniforms + offsets).ravel(), side="right")
    drawn = np.minimum(
        drawn.reshape(uniforms.shape) - offsets * shape[-1], shape[-1] - 1
    )
    drawn = np.sort(drawn, axis=-1)
    first = np.ones_like(drawn, dtype=bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = np.cumsum(first, axis=-1) - 1
    row_index = np.broadcast_to(offsets, drawn.shape)
    counts = np.zeros(drawn.shape, "float64")
    np.add.at(counts, (row_index, group), 1.0)
    ids = np.zeros(drawn.shape, drawn.dtype)
    ids[row_index[first], group[first]] = drawn[first]
    values = np.take_along_axis(rows, ids, axis=-1)
    values = np.where(counts > 0, values, 0.0)
    new_shape = shape[:-1] + (draws,)
    return (
        ids.reshape(new_shape),
        (counts / draws).reshape(new_shape),
        values.reshape(new_shape),
    )
