import keras

from keras_selfdistill import _arguments


def _residual_block(h, embedding, width, name):
    skip = h
    if h.shape[-1] != width:
        skip = keras.layers.Conv2D(width, 1, name=f"{name}_skip")(h)
    h = keras.layers.Conv2D(
        width, 3, padding="same", activation="silu", name=f"{name}_conv1"
    )(h)
    shift = keras.layers.Dense(width, name=f"{name}_time")(embedding)
    h = keras.layers.Add(name=f"{name}_add_time")(
        [h, keras.layers.Reshape((1, 1, width), name=f"{name}_shift")(shift)]
    )
    h = keras.layers.Conv2D(
        width, 3, padding="same", activation="silu", name=f"{name}_conv2"
    )(h)
    return keras.layers.Add(name=f"{name}_out")([skip, h])


def unet(image_shape=(28, 28, 1), widths=(16, 32, 64), embedding_dim=64):
    """A small UNet that predicts the velocity `v` of noisy images.

    Called as `model([z, logsnr])` on images `z` and their `(batch,)`
    log-SNR, as `keras_selfdistill.terms.Denoising` and
    `keras_selfdistill.diffusion.sample` call it. One residual block of two
    3×3 convolutions per resolution on the way down and up, halving the
    resolution between widths, skip connections by concatenation, the
    log-SNR (divided by 20) through a two-layer MLP added to every block.
    No normalisation layers (they doubled the step's cost on CPU at this
    size) and only built-in Keras layers: the model saves and loads as
    plain Keras, without this library.

    The time input is the log-SNR itself, not the sinusoidal embedding of
    the official UNet, which needs an operation Keras has no layer for.

    Args:
        image_shape: `(height, width, channels)`; height and width must be
            divisible by `2 ** (len(widths) - 1)`. Defaults to
            `(28, 28, 1)` (Fashion-MNIST).
        widths: Channels at each resolution, from the input's down.
            Defaults to `(16, 32, 64)` (0.39 M parameters).
        embedding_dim: Width of the log-SNR embedding. Defaults to `64`.

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
    factor = 2 ** (len(widths) - 1)
    if image_shape[0] % factor or image_shape[1] % factor:
        raise ValueError(
            f"With {len(widths)} widths the image is halved "
            f"{len(widths) - 1} times, so its height and width must be "
            f"divisible by {factor}. Received: image_shape={image_shape!r}"
        )
    z = keras.Input(image_shape, name="z")
    logsnr = keras.Input((), name="logsnr")
    embedding = keras.layers.Reshape((1,), name="logsnr_column")(logsnr)
    embedding = keras.layers.Rescaling(1 / 20, name="logsnr_scale")(embedding)
    embedding = keras.layers.Dense(
        embedding_dim, activation="silu", name="time1"
    )(embedding)
    embedding = keras.layers.Dense(
        embedding_dim, activation="silu", name="time2"
    )(embedding)
    h = keras.layers.Conv2D(widths[0], 3, padding="same", name="stem")(z)
    skips = []
    for level, width in enumerate(widths):
        if level:
            h = keras.layers.Conv2D(
                width, 3, strides=2, padding="same", name=f"down{level}"
            )(h)
        h = _residual_block(h, embedding, width, f"encoder{level}")
        skips.append(h)
    h = _residual_block(h, embedding, widths[-1], "middle")
    for level in reversed(range(len(widths))):
        if level < len(widths) - 1:
            h = keras.layers.UpSampling2D(2, name=f"up{level}")(h)
        h = keras.layers.Concatenate(name=f"concat{level}")([h, skips[level]])
        h = _residual_block(h, embedding, widths[level], f"decoder{level}")
    velocity = keras.layers.Conv2D(
        image_shape[-1],
        3,
        padding="same",
        kernel_initializer="zeros",
        name="velocity",
    )(h)
    return keras.Model([z, logsnr], velocity, name="unet")
