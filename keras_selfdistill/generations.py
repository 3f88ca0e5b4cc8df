"""Iterative self-distillation across generations, and its label weight.

Generation 0 learns from the labels; generation `k` learns from the labels
and from generation `k − 1`, frozen, with the objective
`(1 − ξ_k) · CE(y) + ξ_k · KL(teacher ‖ student)` (born-again networks with
the ground-truth weighting of Borup & Andersen).

Borup & Andersen analyse the same iteration for kernel ridge regression:
with `A = K (K + λI)⁻¹` the fit on the training points is
`f_k = A (α_k · y + (1 − α_k) · f_{k−1})`, where `α_k = 1 − ξ_k` weighs the
ground truth. `f_k` is affine in `α_k`, so the `α_k` that brings `f_k`
closest to a reference `y*` has a closed form,
`α* = ⟨y* − A f_{k−1}, A (y − f_{k−1})⟩ / ‖A (y − f_{k−1})‖²`
(`kernel_label_weight`). For a network the same reasoning gives an
estimate from two trainings instead of a grid search: train the generation
once on labels only (`α = 1`) and once on the teacher only (`α = 0`),
take both predictions on held-out data, and project the held-out labels on
the line between them (`estimate_label_weight`); then train the generation
with that weight. `α*` may fall outside `[0, 1]`; `ξ = 1 − α > 1`, labels
weighted negatively, is what Das & Sanghavi find useful under heavy label
noise.

`fit_generations` is 140 lines, 47 of them its docstring: the loop of
generations and its three ways of choosing ξ.

References:

- [Borup & Andersen, 2021](https://arxiv.org/abs/2102.13088)
- [Furlanello et al., 2018](https://arxiv.org/abs/1805.04770)
- [Das & Sanghavi, 2023](https://arxiv.org/abs/2301.13304)
"""

import keras
import numpy as np

from keras_selfdistill import _internals
from keras_selfdistill.distiller import Distiller
from keras_selfdistill.terms.distillation import Distillation


def kernel_ridge_generations(
    kernel, y, regularization, label_weights, eval_kernel=None
):
    """Fits of iterative kernel-ridge self-distillation on training points.

    Args:
        kernel: `(n, n)` kernel matrix of the training inputs.
        y: `(n,)` or `(n, d)` training targets.
        regularization: Ridge coefficient `λ > 0`.
        label_weights: Sequence of `α_k`, the weight of the ground truth at
            step `k = 1, 2, ...` (step 0 is plain ridge regression).
        eval_kernel: Optional `(m, n)` kernel between `m` evaluation points
            and the training points. When given, each fit is returned at
            the evaluation points instead of the training points.

    Returns:
        List of fits `[f_0, f_1, ...]`, on the training points or, with
        `eval_kernel`, on the evaluation points.

    Example:

    ```python
    fits = keras_selfdistill.generations.kernel_ridge_generations(
        kernel, y, 1e-2, [0.3] * 5)
    ```
    """
    kernel = np.asarray(kernel, dtype="float64")
    ridge = _ridge_inverse(kernel, regularization)
    # Step k fits the targets α_k · y + (1 − α_k) · f_{k−1}; a fit anywhere
    # is a kernel row times the ridge weights (K + λI)⁻¹ · targets.
    targets = [np.asarray(y, dtype="float64")]
    for alpha in label_weights:
        previous = kernel @ (ridge @ targets[-1])
        targets.append(alpha * targets[0] + (1.0 - alpha) * previous)
    if eval_kernel is None:
        eval_kernel = kernel
    eval_kernel = np.asarray(eval_kernel, dtype="float64")
    if eval_kernel.ndim != 2 or eval_kernel.shape[1] != len(kernel):
        raise ValueError(
            "`eval_kernel` must have shape (m, n) with n = "
            f"{len(kernel)} training points. "
            f"Received: eval_kernel.shape={eval_kernel.shape}"
        )
    return [eval_kernel @ (ridge @ target) for target in targets]


def kernel_label_weight(kernel, y, previous, reference, regularization):
    """The closed-form best ground-truth weight `α*` for the next step.

    Minimises `‖f(α) − reference‖²` over the training points, where
    `f(α) = A (α y + (1 − α) previous)` and `A = K (K + λI)⁻¹`.

    Args:
        kernel: `(n, n)` kernel matrix.
        y: Training targets.
        previous: The previous step's fit on the training points.
        reference: The target to approach (the noise-free function in the
            analysis; held-out labels in practice).
        regularization: Ridge coefficient `λ > 0`.

    Returns:
        The float `α*` (`ξ* = 1 − α*`).

    Example:

    ```python
    alpha = keras_selfdistill.generations.kernel_label_weight(
        kernel, y, fits[-1], y_true, 1e-2)
    ```
    """
    smoother = _smoother(kernel, regularization)
    base = smoother @ previous
    direction = smoother @ (y - previous)
    return _projection(reference - base, direction)


def estimate_label_weight(labels_only, teacher_only, reference):
    """Estimates `α*` from two trainings of a network, on held-out data.

    Treats predictions as affine in `α`, as they are exactly for kernel
    ridge regression: `f(α) ≈ teacher_only + α (labels_only −
    teacher_only)`, and returns the `α` whose line point is closest to the
    reference.

    Args:
        labels_only: Held-out predictions (e.g. probabilities) of the model
            trained with `α = 1` (`ξ = 0`).
        teacher_only: Held-out predictions of the model trained with
            `α = 0` (`ξ = 1`).
        reference: Held-out targets (e.g. one-hot labels).

    Returns:
        The float `α*`; the generation's `xi` is `1 − α*`.

    Example:

    ```python
    alpha = keras_selfdistill.generations.estimate_label_weight(
        p_labels, p_teacher, keras.utils.to_categorical(y_val))
    ```
    """
    labels_only = np.asarray(labels_only, dtype="float64")
    teacher_only = np.asarray(teacher_only, dtype="float64")
    reference = np.asarray(reference, dtype="float64")
    if not labels_only.shape == teacher_only.shape == reference.shape:
        raise ValueError(
            "Predictions and reference must have the same shape. Received: "
            f"labels_only {labels_only.shape}, teacher_only "
            f"{teacher_only.shape}, reference {reference.shape}"
        )
    return _projection(reference - teacher_only, labels_only - teacher_only)


def _smoother(kernel, regularization):
    kernel = np.asarray(kernel, dtype="float64")
    return kernel @ _ridge_inverse(kernel, regularization)


def _ridge_inverse(kernel, regularization):
    if regularization <= 0:
        raise ValueError(
            "`regularization` must be > 0. "
            f"Received: regularization={regularization}"
        )
    return np.linalg.inv(kernel + regularization * np.eye(len(kernel)))


def _projection(target, direction):
    norm = float(np.sum(np.square(direction)))
    if norm == 0.0:
        raise ValueError(
            "The two candidate fits coincide, so no weight between them can "
            "be estimated (the teacher already equals the labels fit)."
        )
    return float(np.sum(target * direction)) / norm


def fresh_compile_kwargs(compile_kwargs):
    """`compile_kwargs` with a new copy of its optimizer instance, if any.

    Each model of a loop of trainings gets an optimizer of its own: one
    instance compiled into two models would carry the first one's
    iterations and moments into the second.
    """
    kwargs = dict(compile_kwargs)
    optimizer = kwargs.get("optimizer")
    if isinstance(optimizer, keras.optimizers.Optimizer):
        kwargs["optimizer"] = optimizer.__class__.from_config(
            optimizer.get_config()
        )
    return kwargs


def fit_generations(
    build_student,
    x,
    y,
    generations=2,
    xi=0.5,
    validation_data=None,
    compile_kwargs=None,
    **fit_kwargs,
):
    """Trains generations of a student, each distilled from the previous.

    Generation 0 is trained on the labels alone; generation `k ≥ 1` is a
    fresh student from `build_student()` trained with
    `Distillation(previous_student, xi=ξ_k)` (temperature 1), the previous
    generation frozen. With `xi="estimate"`, each `ξ_k` is estimated as in
    Borup & Andersen: the generation is trained once with `ξ = 0` and once
    with `ξ = 1`, `estimate_label_weight` projects the held-out one-hot
    labels between their held-out probabilities, and the generation is then
    trained with `ξ = max(0, 1 − α*)` (three trainings per generation
    instead of a grid search). The projection can give `α* > 1`; a negative
    `ξ` would reward moving away from the teacher (an unbounded objective),
    so it is clipped to 0, plain label training, which is the nearest
    weight the objective allows.

    Args:
        build_student: Callable returning a new, uncompiled student that
            outputs logits.
        x: Training inputs (NumPy arrays or a dict of them).
        y: Integer training labels.
        generations: Number of distilled generations after generation 0.
            Defaults to `2`.
        xi: A float, a list of one float per distilled generation, or
            `"estimate"`. Defaults to `0.5`.
        validation_data: `(x_val, y_val)` held out from training; needed by
            `xi="estimate"`. Defaults to `None`.
        compile_kwargs: Keyword arguments of `Distiller.compile`; an
            optimizer instance is copied for each student. Defaults to Adam
            with sparse categorical cross-entropy from logits.
        **fit_kwargs: Passed to every `fit` (`epochs`, `batch_size`,
            `callbacks`, ...). Unless `verbose=0`, a progress bar counts the
            trainings (generation, last epoch's loss).

    Returns:
        A list of `generations + 1` dicts with keys `"student"`, `"xi"`
        (`None` for generation 0) and `"history"`.

    Example:

    ```python
    results = keras_selfdistill.generations.fit_generations(
        build_student, x_train, y_train, generations=3, xi="estimate",
        validation_data=(x_val, y_val), epochs=20, batch_size=64)
    best = results[-1]["student"]
    ```
    """
    if (
        isinstance(generations, bool)
        or not isinstance(generations, int)
        or (generations < 0)
    ):
        raise ValueError(
            "`generations` must be an int >= 0. "
            f"Received: generations={generations!r}"
        )
    if xi == "estimate":
        if validation_data is None:
            raise ValueError(
                "xi='estimate' needs held-out `validation_data=(x, y)` to "
                "estimate the label weight on."
            )
        schedule = ["estimate"] * generations
    elif isinstance(xi, (list, tuple)):
        if len(xi) != generations:
            raise ValueError(
                "Give one `xi` per distilled generation. Received: "
                f"{len(xi)} values for generations={generations}"
            )
        schedule = list(xi)
    elif isinstance(xi, (int, float)) and not isinstance(xi, bool):
        schedule = [float(xi)] * generations
    else:
        raise TypeError(
            "`xi` must be a float, a list of floats or 'estimate'. "
            f"Received: xi={xi!r}"
        )
    compile_kwargs = dict(
        compile_kwargs
        or {
            "optimizer": "adam",
            "loss": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
        }
    )

    def train(teacher, weight):
        student = build_student()
        terms = [] if teacher is None else [Distillation(teacher, xi=weight)]
        distiller = Distiller(student, terms)
        distiller.compile(**fresh_compile_kwargs(compile_kwargs))
        history = distiller.fit(
            x, y, validation_data=validation_data, **fit_kwargs
        )
        return student, history

    trainings = 1 + sum(3 if w == "estimate" else 1 for w in schedule)
    progress = None
    if fit_kwargs.get("verbose", "auto") != 0:
        progress = keras.utils.Progbar(
            trainings, unit_name="training", stateful_metrics=["generation"]
        )

    def done(generation, history):
        if progress is not None:
            loss = history.history.get("loss", [float("nan")])[-1]
            progress.add(1, [("generation", generation), ("loss", loss)])

    student, history = train(None, None)
    done(0, history)
    results = [{"student": student, "xi": None, "history": history}]
    for generation, weight in enumerate(schedule, start=1):
        teacher = results[-1]["student"]
        if weight == "estimate":
            x_val, y_val = validation_data
            probabilities = []
            for candidate in (0.0, 1.0):
                model, candidate_history = train(teacher, candidate)
                done(generation, candidate_history)
                logits = model.predict(x_val, verbose=0)
                probabilities.append(
                    _internals.to_numpy(keras.ops.softmax(logits))
                )
            reference = np.eye(probabilities[0].shape[-1])[np.asarray(y_val)]
            alpha = estimate_label_weight(*probabilities, reference)
            weight = max(0.0, 1.0 - alpha)
        student, history = train(teacher, float(weight))
        done(generation, history)
        results.append({"student": student, "xi": weight, "history": history})
    return results
