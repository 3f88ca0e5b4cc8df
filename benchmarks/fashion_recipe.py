"""The Fashion-MNIST recipe of `accuracy.py --data fashion_mnist`.

ResNet-style CNNs (basic blocks, batch normalization), the papers'
optimiser (SGD, momentum 0.9, Nesterov, weight decay 5e-4, learning rate
0.1 at batch 128 with a cosine decay to 0, as PS-KD and BYOT train their
CIFAR ResNets), and standard augmentation as Keras preprocessing layers: a
random shift of up to 2 pixels with zero fill (`RandomTranslation`, the
per-image equivalent of 2-pixel padding plus a random 28×28 crop; Keras's
`RandomCrop` draws one offset per batch) and a horizontal flip, applied to
each batch in the `tf.data` pipeline so that a teacher and the student see
the same augmented image.
"""

import keras
import tensorflow as tf

import keras_selfdistill as ksd

BATCH = 128
EXITS = ["block1", "block2"]


def resnet(widths, blocks_per_stage, seed=None):
    """A CIFAR-style ResNet; stage `i` ends in a layer named `block{i}`.

    Batch normalization keeps PyTorch's running-average momentum (0.1,
    Keras `momentum=0.9`), as the papers' code does.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    layers = keras.layers

    def conv_bn(x, width, kernel, strides=1):
        x = layers.Conv2D(
            width, kernel, strides, padding="same", use_bias=False
        )(x)
        return layers.BatchNormalization(momentum=0.9)(x)

    inputs = keras.Input((28, 28, 1))
    x = layers.ReLU()(conv_bn(inputs, widths[0], 3))
    for stage, width in enumerate(widths, 1):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 1 and block == 0 else 1
            shortcut = x
            if strides != 1 or x.shape[-1] != width:
                shortcut = conv_bn(x, width, 1, strides)
            y = layers.ReLU()(conv_bn(x, width, 3, strides))
            y = conv_bn(y, width, 3)
            last = block == blocks_per_stage - 1
            x = layers.Add()([shortcut, y])
            x = layers.ReLU(name=f"block{stage}" if last else None)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def student(seed=None):
    return resnet((16, 32, 64), 1, seed)


def teacher(seed=None):
    return resnet((32, 64, 128), 2, seed)


def optimizer(steps):
    schedule = keras.optimizers.schedules.CosineDecay(0.1, steps)
    return keras.optimizers.SGD(
        schedule, momentum=0.9, nesterov=True, weight_decay=5e-4
    )


def _augmenter(seed):
    return keras.Sequential(
        [
            keras.layers.RandomTranslation(
                2 / 28, 2 / 28, fill_mode="constant", seed=seed
            ),
            keras.layers.RandomFlip("horizontal", seed=seed),
        ]
    )


def dataset(x, y, seed, with_ids=False, augment=True):
    """Shuffled, augmented batches; ids attached before both if asked."""
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if with_ids:
        data = ksd.data.with_sample_ids(data)
    data = data.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(BATCH)
    if augment:
        augmenter = _augmenter(seed)

        def apply(inputs, label):
            if isinstance(inputs, dict):
                inputs = dict(inputs)
                inputs["inputs"] = augmenter(inputs["inputs"], training=True)
                return inputs, label
            return augmenter(inputs, training=True), label

        data = data.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)
