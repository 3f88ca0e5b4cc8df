"""Teacher → assistant → student: rounds of pruning and distillation."""

import os

import keras

from keras_selfdistill import _rounds
from keras_selfdistill.distiller import Distiller
from keras_selfdistill.files import weights_fingerprint
from keras_selfdistill.generations import fresh_compile_kwargs
from keras_selfdistill.pruning import activation
from keras_selfdistill.pruning import magnitude
from keras_selfdistill.pruning import prune
from keras_selfdistill.teachers.teacher import trainable_copy
from keras_selfdistill.terms.distillation import Distillation


def _default_terms(teacher):
    return [Distillation(teacher)]


def prune_and_distil(
    model,
    ratios,
    x=None,
    y=None,
    calibration=None,
    terms=None,
    directory=None,
    compile_kwargs=None,
    **fit_kwargs,
):
    """Rounds of pruning and distillation, each from the round before.

    A multi-step distillation chain (teacher → assistant → student): round
    `i` prunes the previous round's model (the original in round 0) by
    `ratios[i]` with `keras_selfdistill.pruning.prune`, then distils the
    pruned model from it in `fit`. A large capacity gap distils worse than
    a chain of smaller ones (Mirzadeh et al., TAKD); AMD (Han et al.) makes
    the chain's assistants the way Minitron makes a student, by pruning
    and distillation. Each round's teacher is a copy of the previous
    round's model, so the models returned stay trainable.

    Each ratio is a fraction of the previous round's channels, as `prune`
    takes it (`[0.5, 0.5]` keeps a quarter of each group's channels),
    ranked by `keras_selfdistill.pruning.activation` on `calibration` or,
    without it, by `keras_selfdistill.pruning.magnitude`.

    With `directory`, the chain resumes as `progressive_distillation` does:
    a finished round's student is saved as `round-<i>.keras` with its
    history in `round-<i>.json` and loaded, not trained again, by a later
    call; within a round, `keras.callbacks.BackupAndRestore` in
    `backup-round-<i>` restarts a killed round from its last epoch. A round
    records what it is made from (its teacher's weights, ratio, scores'
    data, terms' settings, optimizer and `fit` length) in
    `round-<i>.made_from.json`, and a later call that differs is refused.

    References:

    - [Mirzadeh et al., 2020](https://arxiv.org/abs/1902.03393) (TAKD:
      teacher assistants)
    - [Han et al., 2024](https://arxiv.org/abs/2407.04208) (AMD:
      automatic multi-step distillation)
    - [Muralidharan et al., 2024](https://arxiv.org/abs/2407.14679)
      (Minitron: prune, then distil)

    Args:
        model: The original Functional or Sequential `keras.Model`.
        ratios: One pruning ratio per round (a number, or a dict of group
            name to fraction, as `prune` takes them).
        x: Training inputs, as `fit` takes them (arrays or a dataset).
        y: Training labels, or `None`.
        calibration: Inputs on which each round ranks the channels by
            activation, or `None` for weight magnitude.
        terms: A function from a round's teacher (a `keras.Model`) to the
            round's list of terms. Defaults to
            `lambda teacher: [Distillation(teacher)]`.
        directory: Folder to save rounds in and resume from, or `None`.
        compile_kwargs: `Distiller.compile` arguments for every round (an
            optimizer instance is copied for each). Defaults to
            `{"optimizer": "adam"}`.
        **fit_kwargs: Passed to every round's `fit` (`epochs`,
            `batch_size`, `callbacks`, ...). Unless `verbose=0`, a progress
            bar counts the rounds.

    Returns:
        A list with one dict per round: `"ratio"`, `"student"` (the round's
        distilled model), `"teacher"` (the model it was pruned from and
        distilled from, the original in round 0) and `"history"`
        (`History.history`).

    Example:

    ```python
    ksd = keras_selfdistill
    rounds = ksd.chains.prune_and_distil(
        teacher, [0.5, 0.5], x_train, y_train,
        calibration=x_train[:512], directory="chain",
        compile_kwargs={"optimizer": "adam", "loss": ce},
        epochs=2)
    student = rounds[-1]["student"]
    ```
    """
    if not isinstance(ratios, (list, tuple)) or not ratios:
        raise ValueError(
            "`ratios` lists one pruning ratio per round, at least one. "
            f"Received: ratios={ratios!r}"
        )
    if terms is None:
        terms = _default_terms
    if not callable(terms):
        raise TypeError(
            "`terms` is a function from a round's teacher to its terms, "
            f"e.g. `lambda t: [Distillation(t)]`. Received: terms={terms!r}"
        )
    compile_kwargs = dict(compile_kwargs or {"optimizer": "adam"})
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    progress = None
    if fit_kwargs.get("verbose", "auto") != 0:
        progress = keras.utils.Progbar(
            len(ratios), unit_name="round", stateful_metrics=["params"]
        )
    data = None if calibration is None else weights_fingerprint([calibration])
    results = []
    previous = model
    for index, ratio in enumerate(ratios):
        stem = f"round-{index}"
        teacher = trainable_copy(previous)
        if calibration is None:
            scores = magnitude(previous)
        else:
            scores = activation(previous, calibration)
        pruned = prune(previous, ratio, scores=scores)
        round_terms = terms(teacher)
        student, history = _rounds.run(
            directory,
            stem,
            f"Round {index}",
            lambda: _rounds.made_from(
                previous,
                compile_kwargs,
                fit_kwargs,
                ratio=ratio,
                calibration=data,
                terms=[_settings(term) for term in round_terms],
            ),
            lambda: _train(
                pruned,
                round_terms,
                x,
                y,
                compile_kwargs,
                fit_kwargs,
                directory,
                stem,
            ),
        )
        results.append(
            {
                "ratio": ratio,
                "student": student,
                "teacher": previous,
                "history": history,
            }
        )
        if progress is not None:
            loss = history.get("loss", [float("nan")])[-1]
            progress.add(
                1, [("params", student.count_params()), ("loss", loss)]
            )
        previous = student
    return results


def _settings(term):
    """A term's settings, without its teacher (the record has its
    weights)."""
    config = term.get_config()
    return {
        "class": type(term).__name__,
        **{
            key: value
            for key, value in config.items()
            if key not in ("teacher", "name", "trainable", "dtype")
        },
    }


def _train(student, terms, x, y, compile_kwargs, fit_kwargs, directory, stem):
    distiller = Distiller(student, terms)
    distiller.compile(**fresh_compile_kwargs(compile_kwargs))
    fit_kwargs = dict(fit_kwargs)
    callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    if directory is not None:
        callbacks.append(_rounds.backup(directory, stem))
    history = distiller.fit(x, y, callbacks=callbacks, **fit_kwargs)
    return student, _rounds.plain_history(history)
