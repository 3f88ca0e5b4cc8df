"""Distil a CNN teacher into a small MLP student on MNIST.

Online, the full MNIST comes from TensorFlow Datasets:

    python examples/teacher_student.py --data tfds

Offline, the 5,000 MNIST digits bundled with keras_selfdistill:

    python examples/teacher_student.py --data bundled

The student is trained with `model.fit` and standard callbacks, then saved as
a plain Keras model that loads without keras_selfdistill.
"""

import argparse
import os

import keras
import tensorflow as tf

import keras_selfdistill as ksd


def load(source, limit):
    if source == "tfds":
        import tensorflow_datasets as tfds

        train, test = tfds.load(
            "mnist", split=["train", "test"], as_supervised=True
        )

        def scale(image, label):
            return tf.cast(image, "float32") / 255.0, label

        train, test = train.map(scale), test.map(scale)
    else:
        (x, y), (x_test, y_test) = ksd.datasets.load_mnist()
        train = tf.data.Dataset.from_tensor_slices((x, y))
        test = tf.data.Dataset.from_tensor_slices((x_test, y_test))
    if limit:
        train, test = train.take(limit), test.take(limit)
    train = train.shuffle(10_000, seed=0).batch(64).prefetch(tf.data.AUTOTUNE)
    return train, test.batch(256).prefetch(tf.data.AUTOTUNE)


def teacher_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10),
        ],
        name="teacher",
    )


def student_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="student",
    )


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            "accuracy",
            ksd.metrics.ExpectedCalibrationError(from_logits=True),
        ],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["tfds", "bundled"], default="tfds")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    train, test = load(args.data, args.limit)

    teacher = teacher_model()
    compile_model(teacher)
    teacher.fit(train, epochs=args.teacher_epochs, verbose=2)

    distiller = ksd.Distiller(
        student_model(),
        terms=[
            ksd.terms.Distillation(
                teacher,
                temperature=4.0,
                weight=ksd.schedules.LinearRampUp(ramp_up_epochs=2),
            )
        ],
    )
    compile_model(distiller)
    distiller.fit(
        train,
        validation_data=test,
        epochs=args.epochs,
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=5, restore_best_weights=True
            ),
            keras.callbacks.BackupAndRestore(
                os.path.join(args.output_dir, "backup")
            ),
        ],
    )
    result = distiller.evaluate(test, return_dict=True, verbose=0)
    print(
        f"student: accuracy {result['accuracy']:.4f}, "
        f"ECE {result['expected_calibration_error']:.4f}"
    )
    path = os.path.join(args.output_dir, "student.keras")
    distiller.student.save(path)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
