"""A per-row loss over `(..., vocabulary)` logits, one chunk of rows at once.

A divergence between two `[batch, sequence, vocabulary]` tensors computed
in one piece builds several more of them (log-softmaxes, probabilities,
their products, and as many again in the backward pass); at a vocabulary of
256k that is gigabytes. `per_row` evaluates the loss on a fixed number of
rows at a time in a loop, forward and backward: the backward recomputes
each chunk's forward and takes its vector-Jacobian product, so besides the
two logits only the gradient with respect to the student's logits (the one
tensor of that size the backward must return) and one chunk's temporaries
are alive. The loop is the backend's own (`tf.while_loop`, JAX's
`fori_loop`); which rows a chunk holds never changes the result.
"""

import math

import keras
from keras import ops

from keras_selfdistill import _internals

# Elements of one chunk: 4 M float32 values (16 MB) keep the loop's
# per-iteration overhead below 1% of the work at vocabularies of 32k and up.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocabulary, chunk_elements=CHUNK_ELEMENTS):
    """Rows per chunk at this vocabulary size (at least 1)."""
    return max(1, chunk_elements // max(1, int(vocabulary)))


def per_row(
    function,
    teacher_logits,
    student_logits,
    rows=(),
    scalars=(),
    chunk_elements=CHUNK_ELEMENTS,
):
    """`function(t, s, *rows, *scalars)` row by row, in chunks.

    `function` maps `(n, vocabulary)` logits (and `(n, ...)` row arguments)
    to `n` float32 values. The teacher's logits, the row arguments and the
    scalars are constants here: only the student's logits get a gradient.
    Outputs of fewer than `chunk_elements / 1024` classes whose row count
    is unknown when traced (TensorFlow's batch axis) are classification
    outputs and are evaluated in one piece, as are any that fit one chunk.

    Returns a float32 tensor of the logits' leading shape.
    """
    vocabulary = student_logits.shape[-1]
    if vocabulary is None:
        return function(teacher_logits, student_logits, *rows, *scalars)
    leading = ops.shape(student_logits)[:-1]
    known = [d for d in student_logits.shape[:-1] if d is not None]
    static_rows = math.prod(known) if len(known) == len(leading) else None
    chunk = chunk_rows(vocabulary, chunk_elements)
    if (static_rows is None and chunk >= 1024) or (
        static_rows is not None and static_rows <= chunk
    ):
        return function(teacher_logits, student_logits, *rows, *scalars)
    flat = [
        ops.reshape(teacher_logits, (-1, teacher_logits.shape[-1])),
        ops.reshape(student_logits, (-1, vocabulary)),
    ] + [
        ops.reshape(row, (-1,) + tuple(row.shape[len(leading) :]))
        for row in rows
    ]
    if keras.backend.backend() == "jax":
        values = _jax(function, flat, scalars, chunk)
    elif keras.backend.backend() == "tensorflow":
        values = _tensorflow(function, flat, scalars, chunk)
    else:
        return function(teacher_logits, student_logits, *rows, *scalars)
    return ops.reshape(values, leading)


def _jax(function, flat, scalars, chunk):
    import jax
    import jax.numpy as jnp

    total = flat[1].shape[0]
    count = -(-total // chunk)
    chunk = min(chunk, total)

    def loop(flat, scalars, differentiate):
        def body(i, carry):
            out, gradient = carry
            # The last chunk ends at the last row and may overlap the one
            # before it; its rows are written twice with the same values.
            start = jnp.minimum(i * chunk, total - chunk)
            t, s, *r = [
                jax.lax.dynamic_slice_in_dim(array, start, chunk)
                for array in flat
            ]
            if differentiate:
                value, pullback = jax.vjp(
                    lambda x: function(t, x, *r, *scalars), s
                )
                (piece,) = pullback(jnp.ones_like(value))
                gradient = jax.lax.dynamic_update_slice_in_dim(
                    gradient, piece.astype(gradient.dtype), start, 0
                )
            else:
                value = function(t, s, *r, *scalars)
            out = jax.lax.dynamic_update_slice_in_dim(
                out, value.astype("float32"), start, 0
            )
            return out, gradient

        gradient = jnp.zeros_like(flat[1]) if differentiate else None
        out = jnp.zeros((total,), "float32")
        return jax.lax.fori_loop(0, count, body, (out, gradient))

    @jax.custom_vjp
    def values(flat, scalars):
        return loop(flat, scalars, False)[0]

    def forward(flat, scalars):
        out, gradient = loop(flat, scalars, True)
        return out, gradient

    def backward(gradient, upstream):
        gradient = gradient * upstream[:, None].astype(gradient.dtype)
        return [None, gradient] + [None] * (len(flat) - 2), [None] * len(
            scalars
        )

    values.defvjp(forward, backward)
    return values(list(flat), list(scalars))


def _tensorflow(function, flat, scalars, chunk):
    import tensorflow as tf

    teacher, student, *rows = flat
    teacher = tf.stop_gradient(teacher)
    total = tf.shape(student)[0]
    # A fixed chunk size (a constant once XLA knows the shapes), the last
    # chunk ending at the last row and overlapping the one before it.
    size = tf.minimum(chunk, total)
    count = (total + chunk - 1) // chunk
    # Rows are written in place into fresh buffers (`Empty`, not a constant
    # that graph optimisation could share): a TensorArray's `concat` would
    # hold every chunk and the result at once, twice the size, and
    # `tensor_scatter_nd_update` copies it once. XLA has no `InplaceUpdate`
    # and plans its own buffers.
    in_place = _internals.in_xla_function() is False

    def update(buffer, indices, piece):
        piece = tf.cast(piece, buffer.dtype)
        if in_place:
            return tf.raw_ops.InplaceUpdate(x=buffer, i=indices, v=piece)
        return tf.tensor_scatter_nd_update(buffer, indices[:, None], piece)

    @tf.custom_gradient
    def values(student):
        def body(i, out, gradient):
            start = tf.minimum(i * chunk, total - size)
            t, s, *r = [
                tf.slice(
                    array,
                    tf.concat([[start], tf.zeros_like(tf.shape(array)[1:])], 0),
                    tf.concat([[size], tf.shape(array)[1:]], 0),
                )
                for array in [teacher, student, *rows]
            ]
            with tf.GradientTape() as tape:
                tape.watch(s)
                value = tf.cast(function(t, s, *r, *scalars), "float32")
            indices = start + tf.range(size)
            return (
                i + 1,
                update(out, indices, value),
                update(gradient, indices, tape.gradient(value, s)),
            )

        empty = [
            tf.raw_ops.Empty(shape=[total], dtype="float32", init=True),
            tf.raw_ops.Empty(
                shape=tf.shape(student), dtype=student.dtype, init=True
            ),
        ]
        _, out, gradient = tf.while_loop(
            lambda i, *_: i < count, body, (0, *empty), parallel_iterations=1
        )

        def scaled(upstream):
            return gradient * tf.cast(upstream[:, None], gradient.dtype)

        return out, scaled

    return values(student)
