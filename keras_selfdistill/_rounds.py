"""Rounds of training saved in a folder, each resumable and checked.

A workflow of several `fit`s in a row (progressive distillation's
halvings, a chain of prune-and-distil rounds) saves each finished round's
student and history, records what the round was made from, and on a later
call loads a finished round, resumes an unfinished one from its backup,
or refuses one made from another teacher or other settings.
"""

import json
import os

import keras

from keras_selfdistill.files import weights_fingerprint


def run(directory, stem, description, record, train):
    """One round: `train()` (which returns `(student, history)`), or with
    `directory`, the round's checked record (`record()`, see `made_from`),
    then the finished round loaded, or trained (resuming from its backup)
    and saved."""
    if directory is None:
        return train()
    check_made_from(directory, stem, record(), description)
    finished = load(directory, stem)
    if finished is not None:
        return finished
    student, history = train()
    save(directory, stem, student, history)
    return student, history


def made_from(teacher, compile_kwargs, fit_kwargs, **settings):
    """What a round is made from: its teacher's weights, the optimizer, the
    `fit` settings that decide its length and `settings`, as JSON values
    (names left out: Keras numbers them per process)."""
    optimizer = keras.saving.serialize_keras_object(
        keras.optimizers.get(compile_kwargs["optimizer"])
    )
    optimizer["config"].pop("name", None)
    record = {
        "teacher_weights": weights_fingerprint(teacher.weights),
        "optimizer": optimizer,
        "fit": {
            key: fit_kwargs.get(key)
            for key in ("epochs", "batch_size", "steps_per_epoch")
        },
        **settings,
    }
    return json.loads(json.dumps(record, sort_keys=True, default=repr))


def check_made_from(directory, stem, record, description):
    """Refuses a round (saved, or backed up mid-way) made from another
    teacher or settings; records this round's before it trains.

    The round's files are `<directory>/<stem>.*`; `description` names it
    in the message ("The 4-step round").
    """
    path = os.path.join(directory, f"{stem}.made_from.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, f"{stem}.keras")):
            return  # Saved by an earlier version, which kept no record.
        partial = path + ".partial"
        with open(partial, "w") as file:
            json.dump(record, file, indent=1, sort_keys=True)
        os.replace(partial, path)
        return
    with open(path) as file:
        stored = json.load(file)
    if stored != record:
        changed = sorted(k for k in record if stored.get(k) != record[k])
        raise ValueError(
            f"{description} in '{directory}' was made from another "
            f"teacher or other settings ({', '.join(changed)} differ), so "
            "it would be loaded, or resumed, and distilled further as if it "
            "were this run's. Use a new directory, or delete that round and "
            "the rounds after it. Received: "
            + ", ".join(f"{key}={record[key]!r}" for key in changed)
        )


def load(directory, stem):
    """The finished round's `(student, history)`, or `None`."""
    path = os.path.join(directory, f"{stem}.keras")
    if not os.path.exists(path):
        return None
    student = keras.saving.load_model(path)
    with open(os.path.join(directory, f"{stem}.json")) as file:
        return student, json.load(file)


def backup(directory, stem):
    """The `BackupAndRestore` callback of an unfinished round."""
    return keras.callbacks.BackupAndRestore(
        os.path.join(directory, f"backup-{stem}")
    )


def plain_history(history):
    """A `keras.callbacks.History`'s values as JSON-ready floats."""
    return {
        key: [float(v) for v in values]
        for key, values in history.history.items()
    }


def save(directory, stem, student, history):
    """Saves a finished round; the student last, so that a round counts as
    finished only once both files are whole."""
    path = os.path.join(directory, f"{stem}.keras")
    history_path = os.path.join(directory, f"{stem}.json")
    partial = os.path.join(directory, f"{stem}.partial.keras")
    student.save(partial)
    with open(history_path + ".partial", "w") as file:
        json.dump(history, file)
    os.replace(history_path + ".partial", history_path)
    os.replace(partial, path)
