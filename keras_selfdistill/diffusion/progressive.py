"""Progressive distillation of a diffusion sampler, round after round.

`progressive_distillation` is 149 lines, 73 of them its docstring; the
rounds' saving, resuming and checks are `keras_selfdistill._rounds`'s.
"""

import os

import keras

from keras_selfdistill import _arguments
from keras_selfdistill import _rounds
from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill.distiller import Distiller
from keras_selfdistill.generations import fresh_compile_kwargs
from keras_selfdistill.teachers.ddim import DDIM
from keras_selfdistill.teachers.teacher import trainable_copy
from keras_selfdistill.terms.denoising import Denoising


def _copy(model, name):
    # Trainable even when `model` is a frozen teacher's (used as a
    # teacher before): a plain clone of one would not train on TensorFlow.
    clone = trainable_copy(model)
    clone.name = name
    return clone


def _halvings(num_steps, end_steps):
    for name, value in (("num_steps", num_steps), ("end_steps", end_steps)):
        if not _arguments.is_integer(value) or value < 1:
            raise ValueError(
                f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
            )
    rounds = []
    steps = num_steps
    while steps > end_steps:
        if steps % 2:
            break
        steps //= 2
        rounds.append(steps)
    if steps != end_steps or not rounds:
        raise ValueError(
            "Each round halves the number of steps, so `num_steps` must be "
            "`end_steps` times a power of two, and larger. Received: "
            f"num_steps={num_steps}, end_steps={end_steps}"
        )
    return rounds


def progressive_distillation(
    model,
    data,
    num_steps,
    end_steps=1,
    directory=None,
    compile_kwargs=None,
    **fit_kwargs,
):
    """Rounds of `fit` that halve a diffusion sampler's steps each time.

    Round `k` trains a student, initialised with the weights of the
    previous round's model, with `keras_selfdistill.terms.Denoising` on a
    `keras_selfdistill.teachers.DDIM` teacher: the previous model, frozen,
    sampled with `N` steps, teaches the student to sample with `N / 2`.
    The first teacher is `model` at `num_steps`; the rounds stop at
    `end_steps`. Each round has a fresh optimizer (the official code
    restarts Adam and its learning-rate schedule every round) and the same
    `fit` arguments; `model` itself is not changed.

    With `directory`, the run resumes: a finished round's student is saved
    there as `steps-<N>.keras` (written to a temporary name, then renamed,
    so a crash never leaves a partial file) and its history as
    `steps-<N>.json`; a round whose file exists is loaded, not trained
    again. Within a round, `keras.callbacks.BackupAndRestore` in
    `backup-steps-<N>/` saves the distiller (student, optimizer, the term's
    seed generator) at every epoch's end, so a killed round restarts from
    its last saved epoch and ends where an uninterrupted one does (its
    returned history then holds the epochs trained after the restart).
    Each round records what it is made from in `steps-<N>.made_from.json`
    before it trains: the fingerprint of its teacher's weights
    (`keras_selfdistill.files.weights_fingerprint`), the teacher's steps,
    the schedule, weighting, seed, optimizer and `fit`'s `epochs`,
    `batch_size` and `steps_per_epoch`. A later call whose round differs
    (a retrained base model, another weighting) is refused instead of
    loading or resuming the stale round.

    Reference:

    - [Salimans & Ho, 2022](https://arxiv.org/abs/2202.00512),
      algorithm 2; the distillation loop of the official code
      (`google-research/diffusion_distillation`: the teacher's
      `num_sample_steps` halved after each round's `steps_per_iter`
      steps, the student starting from the teacher).

    Args:
        model: The trained v-prediction model, called as
            `model([z, logsnr])` (its moving-average weights, if trained
            with `use_ema=True`).
        data: Clean images in `[−1, 1]`: a NumPy array or a batched
            `tf.data.Dataset` of images alone.
        num_steps: The sampler steps of `model`, the first teacher.
        end_steps: The steps of the last student. Defaults to `1`.
        directory: Folder to save rounds in and resume from, or `None`.
            Defaults to `None`.
        compile_kwargs: Keyword arguments of `Distiller.compile`, with
            `optimizer` (an instance is copied for each round) and no
            `loss`. Defaults to Adam at 1e-4 with the official gradient
            clipping (global norm 1), at a constant rate: the official
            code anneals it linearly to 0 over each round, which needs
            the round's length (give a `PolynomialDecay` to
            `end_learning_rate=0` over the round's steps, as the example
            does).
        **fit_kwargs: Passed to every round's `fit` (`epochs`,
            `batch_size`, `callbacks`, ...). `schedule`, `weighting` and
            `seed` go to the `Denoising` term and its teacher instead (a
            round's seed is `seed + round index`). Unless `verbose=0`, a
            progress bar counts the rounds.

    Returns:
        A list with one dict per round: `"num_steps"` (the student's),
        `"student"` and `"history"` (a dict of lists, as in `History`).

    Example:

    ```python
    rounds = keras_selfdistill.diffusion.progressive_distillation(
        base_model, images, num_steps=16, end_steps=2, epochs=5,
        batch_size=128, directory="rounds")
    two_step = rounds[-1]["student"]
    ```
    """
    rounds = _halvings(num_steps, end_steps)
    schedule = fit_kwargs.pop("schedule", None) or CosineSchedule()
    weighting = fit_kwargs.pop("weighting", "truncated_snr")
    seed = fit_kwargs.pop("seed", None)
    compile_kwargs = dict(
        compile_kwargs
        or {"optimizer": keras.optimizers.Adam(1e-4, global_clipnorm=1.0)}
    )
    if compile_kwargs.get("loss") is not None:
        raise ValueError(
            "Progressive distillation regresses on the teacher's targets: "
            "give `compile_kwargs` no `loss`. Received: "
            f"loss={compile_kwargs['loss']!r}"
        )
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    progress = None
    if fit_kwargs.get("verbose", "auto") != 0:
        progress = keras.utils.Progbar(
            len(rounds), unit_name="round", stateful_metrics=["steps"]
        )
    results = []
    previous = model
    for index, steps in enumerate(rounds):
        stem = f"steps-{steps}"
        round_seed = None if seed is None else seed + index
        student, history = _rounds.run(
            directory,
            stem,
            f"The {steps}-step round",
            lambda: _rounds.made_from(
                previous,
                compile_kwargs,
                fit_kwargs,
                teacher_steps=2 * steps,
                schedule=keras.saving.serialize_keras_object(schedule),
                weighting=weighting,
                seed=round_seed,
            ),
            lambda: _train_round(
                previous,
                data,
                steps,
                schedule,
                weighting,
                round_seed,
                compile_kwargs,
                fit_kwargs,
                directory,
            ),
        )
        results.append(
            {"num_steps": steps, "student": student, "history": history}
        )
        if progress is not None:
            loss = history.get("loss", [float("nan")])[-1]
            progress.add(1, [("steps", steps), ("loss", loss)])
        previous = student
    return results


def _train_round(
    previous,
    data,
    steps,
    schedule,
    weighting,
    seed,
    compile_kwargs,
    fit_kwargs,
    directory,
):
    teacher = DDIM(
        _copy(previous, f"teacher_{2 * steps}_steps"),
        num_steps=2 * steps,
        schedule=schedule,
    )
    student = _copy(previous, f"student_{steps}_steps")
    distiller = Distiller(
        student,
        [Denoising(teacher, weighting=weighting, seed=seed)],
    )
    distiller.compile(**fresh_compile_kwargs(compile_kwargs))
    fit_kwargs = dict(fit_kwargs)
    callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    if directory is not None:
        callbacks.append(_rounds.backup(directory, f"steps-{steps}"))
    history = distiller.fit(data, callbacks=callbacks, **fit_kwargs)
    return student, _rounds.plain_history(history)
