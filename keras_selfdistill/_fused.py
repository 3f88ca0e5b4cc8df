"""A loss of an output layer's logits that never builds all of them.

`head_loss` takes the hidden states that feed a linear head and the head's
weights, and evaluates a per-row loss of the head's logits one chunk of
rows at a time: `[rows, vocabulary]` logits exist for one chunk only, in
the forward pass and in the backward pass. Gradients with respect to the
hidden states, the kernel and the bias are computed chunk by chunk too, as
Liger-Kernel's fused linear losses and Apple's Cut Cross-Entropy do,
either:

- in the forward pass (`recompute=False`): the loop accumulates the
  gradients as it goes, and the backward pass only scales them by the
  upstream gradient. One projection and its two gradient products per
  chunk; the accumulated kernel gradient (the size of the kernel) is
  held from the forward to the backward pass.
- by recomputation (`recompute=True`): the forward loop computes the
  loss alone; the backward loop projects each chunk again. One more
  projection per chunk, and nothing held between the passes.

The per-row coefficients are known before the loss (a reduction's weights,
a term's weight, ξ): the objective is `Σ_rows Σ_k coefficients · values`,
a scalar, which is what lets the forward pass compute the gradient. The
loop is the backend's own (`tf.while_loop`, JAX's `fori_loop`); the rows
are padded to a whole number of chunks, the padding weighted zero.
"""

import keras
from keras import ops

from keras_selfdistill import _heads
from keras_selfdistill import _internals


def head_loss(
    function,
    hidden,
    kernel,
    bias,
    rows,
    coefficients,
    reports,
    constants=(),
    transposed=False,
    chunk=256,
    recompute=False,
    train_head=True,
):
    """`Σ coefficients · function(logits, ...)`, chunk by chunk.

    Args:
        function: Maps `(logits, *row_chunks, *constants)` to `(n, K)`
            float32 values; `logits` are the head's `(n, vocabulary)`
            float32 logits of `n` rows.
        hidden: `(rows, width)` inputs of the head.
        kernel: The head's `(width, vocabulary)` matrix, or `(vocabulary,
            width)` with `transposed` (a tied embedding).
        bias: `(vocabulary,)` or `None`.
        rows: Tensors whose first axis is the rows (labels, a teacher's
            hidden states or logits); constants to the gradient.
        coefficients: `(rows, K)` weights of the objective.
        reports: `(rows, K)` weights of the reported totals.
        constants: Tensors every chunk reads (a teacher's head); no
            gradient.
        transposed: Whether `kernel` is `(vocabulary, width)`.
        chunk: Rows per chunk.
        recompute: Whether the backward pass projects again (see above).
        train_head: Whether the kernel and bias get a gradient (a frozen
            head's is `None`, and never computed).

    Returns:
        `(objective, totals)`: the scalar objective, differentiable with
        respect to `hidden`, `kernel` and `bias`, and the `(K,)` totals
        `Σ_rows reports · values`, without gradient.
    """
    coefficients = ops.cast(coefficients, "float32")
    reports = ops.cast(reports, "float32")
    if keras.backend.backend() == "jax":
        run = _jax
    elif keras.backend.backend() == "tensorflow":
        run = _tensorflow
    else:
        raise ValueError(
            "The fused head loss runs on the TensorFlow and JAX backends. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    return run(
        _Chunk(function, transposed, bias is not None),
        hidden,
        kernel,
        bias,
        list(rows),
        coefficients,
        reports,
        list(constants),
        int(chunk),
        bool(recompute),
        bool(train_head),
    )


class _Chunk:
    """One chunk's objective and totals from its rows and the head."""

    def __init__(self, function, transposed, has_bias):
        self.function = function
        self.transposed = transposed
        self.has_bias = has_bias

    def logits(self, hidden, kernel, bias):
        return _heads.project(
            hidden, kernel, bias if self.has_bias else None, self.transposed
        )

    def __call__(
        self, hidden, kernel, bias, rows, coefficients, reports, constants
    ):
        logits = self.logits(hidden, kernel, bias)
        return self.of_logits(logits, rows, coefficients, reports, constants)

    def of_logits(self, logits, rows, coefficients, reports, constants):
        values = ops.cast(self.function(logits, *rows, *constants), "float32")
        objective = ops.sum(coefficients * values)
        totals = ops.sum(reports * values, axis=0)
        return objective, totals


def _jax(
    chunk_fn,
    hidden,
    kernel,
    bias,
    rows,
    coefficients,
    reports,
    constants,
    chunk,
    recompute,
    train_head,
):
    import jax
    import jax.numpy as jnp

    total = hidden.shape[0]
    chunk = max(1, min(chunk, total))
    count = -(-total // chunk)
    padded = count * chunk

    def pad(array):
        return jnp.pad(
            array, [(0, padded - total)] + [(0, 0)] * (array.ndim - 1)
        )

    if bias is None:
        bias = jnp.zeros((), "float32")

    def loop(params, given, differentiate, scale):
        hidden, kernel, bias = params
        rows, coefficients, reports, constants = given
        hidden, coefficients, reports = (
            pad(hidden),
            pad(coefficients),
            pad(reports),
        )
        rows = [pad(r) for r in rows]

        def body(i, carry):
            objective, totals, d_hidden, d_kernel, d_bias = carry
            start = i * chunk

            def cut(array):
                return jax.lax.dynamic_slice_in_dim(array, start, chunk)

            h, c, r = cut(hidden), cut(coefficients), cut(reports)
            pieces = [cut(row) for row in rows]

            def value(h, kernel, bias):
                return chunk_fn(h, kernel, bias, pieces, c, r, constants)

            if differentiate:
                if train_head:
                    piece, pullback, sums = jax.vjp(
                        value, h, kernel, bias, has_aux=True
                    )
                    g_h, g_k, g_b = pullback(scale)
                    d_kernel = d_kernel + g_k.astype(d_kernel.dtype)
                    d_bias = d_bias + g_b.astype(d_bias.dtype)
                else:
                    piece, pullback, sums = jax.vjp(
                        lambda h: value(h, kernel, bias), h, has_aux=True
                    )
                    (g_h,) = pullback(scale)
                d_hidden = jax.lax.dynamic_update_slice_in_dim(
                    d_hidden, g_h.astype(d_hidden.dtype), start, 0
                )
            else:
                piece, sums = value(h, kernel, bias)
            return objective + piece, totals + sums, d_hidden, d_kernel, d_bias

        k = reports.shape[-1]
        head = differentiate and train_head
        zeros = (
            jnp.zeros((), "float32"),
            jnp.zeros((k,), "float32"),
            jnp.zeros(hidden.shape if differentiate else (), hidden.dtype),
            jnp.zeros(kernel.shape if head else (), "float32"),
            jnp.zeros(bias.shape if head else (), "float32"),
        )
        objective, totals, d_hidden, d_kernel, d_bias = jax.lax.fori_loop(
            0, count, body, zeros
        )
        grads = None
        if differentiate:
            grads = (d_hidden[:total], None, None)
            if train_head:
                grads = (
                    grads[0],
                    d_kernel.astype(kernel.dtype),
                    d_bias.astype(bias.dtype),
                )
        return objective, totals, grads

    @jax.custom_vjp
    def fused(params, given):
        objective, totals, _ = loop(params, given, False, 1.0)
        return objective, totals

    def forward(params, given):
        if recompute:
            objective, totals, _ = loop(params, given, False, 1.0)
            return (objective, totals), (params, given)
        objective, totals, grads = loop(params, given, True, 1.0)
        return (objective, totals), grads

    def backward(residuals, upstream):
        g = upstream[0]
        if recompute:
            params, given = residuals
            _, _, grads = loop(params, given, True, g)
        else:
            grads = tuple(
                None if x is None else x * g.astype(x.dtype) for x in residuals
            )
        return grads, nothing

    given = (rows, coefficients, reports, constants)
    # The rows, weights and constants get no gradient.
    nothing = jax.tree_util.tree_map(lambda _: None, given)
    fused.defvjp(forward, backward)
    objective, totals = fused((hidden, kernel, bias), given)
    return objective, jax.lax.stop_gradient(totals)


def _tensorflow(
    chunk_fn,
    hidden,
    kernel,
    bias,
    rows,
    coefficients,
    reports,
    constants,
    chunk,
    recompute,
    train_head,
):
    import tensorflow as tf

    total = tf.shape(hidden)[0]
    count = (total + chunk - 1) // chunk
    padded = count * chunk
    k = reports.shape[-1]
    has_bias = bias is not None
    rows = [tf.stop_gradient(r) for r in rows]
    constants = [tf.stop_gradient(c) for c in constants]

    def pad(array):
        widths = tf.concat(
            [[[0, padded - total]], tf.zeros([tf.rank(array) - 1, 2], "int32")],
            0,
        )
        return tf.pad(array, widths)

    in_place = _internals.in_xla_function() is False

    def update(buffer, indices, piece):
        piece = tf.cast(piece, buffer.dtype)
        if in_place:
            return tf.raw_ops.InplaceUpdate(x=buffer, i=indices, v=piece)
        return tf.tensor_scatter_nd_update(buffer, indices[:, None], piece)

    def loop(hidden, kernel, bias, differentiate, scale):
        padded_hidden = pad(hidden)
        c_all, r_all = pad(coefficients), pad(reports)
        pieces_all = [pad(r) for r in rows]

        def body(i, objective, totals, d_hidden, d_kernel, d_bias):
            start = i * chunk

            def cut(array):
                # A slice of static size, which XLA needs.
                rank = len(array.shape)
                return tf.slice(
                    array,
                    [start] + [0] * (rank - 1),
                    [chunk] + [-1] * (rank - 1),
                )

            h, c, r = cut(padded_hidden), cut(c_all), cut(r_all)
            pieces = [cut(p) for p in pieces_all]
            if differentiate:
                # The tape differentiates the loss with respect to the
                # chunk's logits; the products with the head are written
                # out, so that no kernel-sized transpose is made per chunk.
                logits = chunk_fn.logits(h, kernel, bias)
                with tf.GradientTape() as tape:
                    tape.watch(logits)
                    piece, sums = chunk_fn.of_logits(
                        logits, pieces, c, r, constants
                    )
                    scaled = piece * scale
                g = tape.gradient(scaled, logits)
                if chunk_fn.transposed:
                    g_hidden = tf.matmul(g, tf.cast(kernel, "float32"))
                else:
                    g_hidden = tf.matmul(
                        g, tf.cast(kernel, "float32"), transpose_b=True
                    )
                d_hidden = update(d_hidden, start + tf.range(chunk), g_hidden)
                if train_head:
                    h32 = tf.cast(h, "float32")
                    if chunk_fn.transposed:
                        g_kernel = tf.matmul(g, h32, transpose_a=True)
                    else:
                        g_kernel = tf.matmul(h32, g, transpose_a=True)
                    # A new sum, not `InplaceAdd`, which runs on one core:
                    # 2.5× slower here for one more kernel-sized buffer.
                    d_kernel = d_kernel + g_kernel
                if train_head and has_bias:
                    d_bias = d_bias + tf.reduce_sum(g, axis=0)
            else:
                piece, sums = chunk_fn(h, kernel, bias, pieces, c, r, constants)
            return (
                i + 1,
                objective + piece,
                totals + sums,
                d_hidden,
                d_kernel,
                d_bias,
            )

        head = differentiate and train_head
        # The hidden states' gradient is written in place into a fresh
        # buffer (`Empty`, which graph optimisation cannot share), as
        # `_rows` does; XLA has no `InplaceUpdate` and plans its buffers.
        d_hidden = tf.zeros((), hidden.dtype)
        if differentiate:
            d_hidden = tf.raw_ops.Empty(
                shape=tf.shape(padded_hidden), dtype=hidden.dtype, init=True
            )
        start = (
            0,
            tf.zeros((), "float32"),
            tf.zeros((k,), "float32"),
            d_hidden,
            tf.zeros(tf.shape(kernel) if head else (), "float32"),
            tf.zeros(tf.shape(bias) if head and has_bias else (), "float32"),
        )
        _, objective, totals, d_hidden, d_kernel, d_bias = tf.while_loop(
            lambda i, *_: i < count, body, start, parallel_iterations=1
        )
        grads = None
        if differentiate:
            grads = [d_hidden[:total], None]
            if train_head:
                grads[1] = tf.cast(d_kernel, kernel.dtype)
            if has_bias:
                grads.append(
                    tf.cast(d_bias, bias.dtype) if train_head else None
                )
        return objective, totals, grads

    # Reads of the variables, so that the gradient reaches them through
    # the function's inputs (a variable used inside it is refused).
    params = [tf.convert_to_tensor(hidden), tf.convert_to_tensor(kernel)]
    if has_bias:
        params.append(tf.convert_to_tensor(bias))

    @tf.custom_gradient
    def fused(*params):
        hidden, kernel = params[0], params[1]
        bias = params[2] if has_bias else None
        if recompute:
            objective, totals, _ = loop(hidden, kernel, bias, False, 1.0)
        else:
            objective, totals, grads = loop(hidden, kernel, bias, True, 1.0)

        def backward(upstream, _totals_upstream=None):
            if recompute:
                return loop(hidden, kernel, bias, True, upstream)[2]
            return [
                None if g is None else g * tf.cast(upstream, g.dtype)
                for g in grads
            ]

        return (objective, tf.stop_gradient(totals)), backward

    objective, totals = fused(*params)
    return objective, tf.stop_gradient(totals)
