import math

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _arguments

_TIME_EMBEDDINGS = ("sinusoidal", "linear")


def _time_features(logsnr, kind, dim):
    """The time input as features: the official sinusoids, or `λ / 20`.

    `"sinusoidal"` is `get_timestep_embedding` of the official UNet at
    `logsnr_input_type="inv_cos"`: the time `t = arctan(exp(−λ/2)) / (π/2)`
    of the cosine schedule (clipped at ±20), times 1000, under `dim / 2`
    geometric frequencies from 1 to 1/10000, as `[sin, cos]`. Built from
    `keras.ops` in the functional graph, which Keras saves as built-in
    operations: the model still loads with `safe_mode=True` without this
    library.
    """
    # In float32 whatever the dtype policy: a half-precision log-SNR puts
    # the angles (up to 1000 radians) radians off, and the model cannot
    # tell the noise levels apart (the official embedding is float32).
    column = keras.layers.Reshape((1,), dtype="float32", name="logsnr_column")(
        logsnr
    )
    if kind == "linear":
        return keras.layers.Rescaling(1 / 20, name="logsnr_scale")(column)
    half = dim // 2
    frequencies = np.exp(
        -math.log(10000.0) * np.arange(half) / max(half - 1, 1)
    )
    time = ops.arctan(ops.exp(-0.5 * ops.clip(column, -20.0, 20.0)))
    angles = ops.multiply(time, (1000.0 / (0.5 * math.pi)) * frequencies)
    return keras.layers.Concatenate(name="time_sinusoids")(
        [ops.sin(angles), ops.cos(angles)]
    )


def _residual_block(h, embedding, width, name, groups):
    """The official `ResnetBlock`: pre-activation, the time embedding as a
    scale and shift after the first convolution, the second convolution
    zero-initialised so that the block starts as the identity."""
    skip = h
    if h.shape[-1] != width:
        skip = keras.layers.Conv2D(width, 1, name=f"{name}_skip")(h)
    if groups:
        h = keras.layers.GroupNormalization(groups, name=f"{name}_norm1")(h)
    h = keras.layers.Activation("silu", name=f"{name}_act1")(h)
    h = keras.layers.Conv2D(width, 3, padding="same", name=f"{name}_conv1")(h)
    if groups:
        h = keras.layers.GroupNormalization(groups, name=f"{name}_norm2")(h)
    active = keras.layers.Activation("silu", name=f"{name}_emb_act")(embedding)
    scale = keras.layers.Dense(width, name=f"{name}_scale")(active)
    shift = keras.layers.Dense(width, name=f"{name}_shift")(active)
    scale = keras.layers.Reshape((1, 1, width), name=f"{name}_scale_map")(scale)
    shift = keras.layers.Reshape((1, 1, width), name=f"{name}_shift_map")(shift)
    scaled = keras.layers.Multiply(name=f"{name}_scaled")([h, scale])
    h = keras.layers.Add(name=f"{name}_modulated")([h, scaled, shift])
    h = keras.layers.Activation("silu", name=f"{name}_act2")(h)
    h = keras.layers.Conv2D(
        width,
        3,
        padding="same",
        kernel_initializer="zeros",
        name=f"{name}_conv2",
    )(h)
    return keras.layers.Add(name=f"{name}_out")([skip, h])


def unet(
    image_shape=(28, 28, 1),
    widths=(16, 32, 48),
    embedding_dim=64,
    blocks=1,
    time_embedding="sinusoidal",
    normalization=False,
):
    """A small UNet that predicts the velocity `v` of noisy images.

    Called as `model([z, logsnr])` on images `z` and their `(batch,)`
    log-SNR, as `keras_selfdistill.terms.Denoising` and
    `keras_selfdistill.diffusion.sample` call it. The official UNet of
    progressive distillation at a small size: the log-SNR as the time of
    the cosine schedule under sinusoidal features, through a two-layer
    MLP; residual blocks that are pre-activated, take the time as a scale
    and a shift, and start as the identity (their second convolution is
    zero); `blocks` of them per resolution on the way down and one more on
    the way up, each fed by a skip connection; strided convolutions down,
    nearest-neighbour upsampling and a convolution up. Left out at this
    size: self-attention and dropout, and by default group normalisation
    (`normalization=True` adds it; it doubles the step's cost on a CPU).
    Only built-in Keras layers and operations: the model saves and loads
    as plain Keras, without this library.

    Reference:

    - `diffusion_distillation/unet.py` of the official progressive
      distillation code (`google-research/diffusion_distillation`), after
      the Improved DDPM UNet.

    Args:
        image_shape: `(height, width, channels)`; height and width must be
            divisible by `2 ** (len(widths) - 1)`. Defaults to
            `(28, 28, 1)` (Fashion-MNIST).
        widths: Channels at each resolution, from the input's down.
            Defaults to `(16, 32, 48)` (0.39 M parameters).
        embedding_dim: Width of the time embedding. Defaults to `64`.
        blocks: Residual blocks per resolution on the way down (the
            official `num_res_blocks`). Defaults to `1`.
        time_embedding: `"sinusoidal"` (the official embedding) or
            `"linear"` (the log-SNR divided by 20 into the MLP, this
            library's UNet before 0.9). Defaults to `"sinusoidal"`.
        normalization: Whether blocks normalise with
            `GroupNormalization` (8 groups), as the official ones do (32
            groups). Defaults to `False`.

    Returns:
        A `keras.Model` named `"unet"`.

    Example:

    ```python
    model = keras_selfdistill.diffusion.unet((28, 28, 1))
    velocity = model([noisy_images, logsnr])
    ```
    """
    if len(image_shape) != 3:
        raise ValueError(
            "`image_shape` must be (height, width, channels). Received: "
            f"image_shape={image_shape!r}"
        )
    if not widths or not all(
        _arguments.is_integer(w) and w > 0 for w in widths
    ):
        raise ValueError(
            "`widths` must be a non-empty sequence of positive integers. "
            f"Received: widths={widths!r}"
        )
    _arguments.check_positive_int("`unet`", "blocks", blocks)
    _arguments.check_positive_int("`unet`", "embedding_dim", embedding_dim)
    if time_embedding not in _TIME_EMBEDDINGS:
        raise ValueError(
            "`time_embedding` must be one of "
            f"{', '.join(map(repr, _TIME_EMBEDDINGS))}. Received: "
            f"time_embedding={time_embedding!r}"
        )
    groups = 0
    if normalization:
        groups = 8
        if any(w % groups for w in widths):
            raise ValueError(
                "With `normalization=True` every width must be divisible by "
                f"the {groups} groups. Received: widths={widths!r}"
            )
    factor = 2 ** (len(widths) - 1)
    if image_shape[0] % factor or image_shape[1] % factor:
        raise ValueError(
            f"With {len(widths)} widths the image is halved "
            f"{len(widths) - 1} times, so its height and width must be "
            f"divisible by {factor}. Received: image_shape={image_shape!r}"
        )
    z = keras.Input(image_shape, name="z")
    logsnr = keras.Input((), name="logsnr")
    embedding = _time_features(logsnr, time_embedding, embedding_dim)
    embedding = keras.layers.Dense(
        embedding_dim, activation="silu", name="time1"
    )(embedding)
    embedding = keras.layers.Dense(embedding_dim, name="time2")(embedding)
    h = keras.layers.Conv2D(widths[0], 3, padding="same", name="stem")(z)
    skips = [h]
    for level, width in enumerate(widths):
        if level:
            h = keras.layers.Conv2D(
                h.shape[-1], 3, strides=2, padding="same", name=f"down{level}"
            )(h)
            skips.append(h)
        for block in range(blocks):
            h = _residual_block(
                h, embedding, width, f"encoder{level}_{block}", groups
            )
            skips.append(h)
    h = _residual_block(h, embedding, widths[-1], "middle", groups)
    for level in reversed(range(len(widths))):
        for block in range(blocks + 1):
            h = keras.layers.Concatenate(name=f"concat{level}_{block}")(
                [h, skips.pop()]
            )
            h = _residual_block(
                h, embedding, widths[level], f"decoder{level}_{block}", groups
            )
        if level:
            h = keras.layers.UpSampling2D(2, name=f"up{level}")(h)
            h = keras.layers.Conv2D(
                h.shape[-1], 3, padding="same", name=f"up{level}_conv"
            )(h)
    if groups:
        h = keras.layers.GroupNormalization(groups, name="out_norm")(h)
    h = keras.layers.Activation("silu", name="out_act")(h)
    velocity = keras.layers.Conv2D(
        image_shape[-1],
        3,
        padding="same",
        kernel_initializer="zeros",
        name="velocity",
    )(h)
    return keras.Model([z, logsnr], velocity, name="unet")
