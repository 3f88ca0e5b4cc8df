"""Plots of what distillation changes: losses, calibration, exits.

Each function returns a `matplotlib.figure.Figure` built without pyplot,
so it works headless (a script, CI), shows in a notebook as a cell's
value, and saves with `figure.savefig(path)`.
matplotlib is an optional dependency: the `plots` extra (`pip install
".[plots]"` in a clone).
"""

import numpy as np

from keras_selfdistill.metrics import ExpectedCalibrationError

INSTALL_HINT = (
    "Plots need matplotlib, an optional dependency. Install it with "
    'the `plots` extra (`pip install ".[plots]"` in a clone of the '
    "repository) or `pip install matplotlib`."
)


def _figure(columns, width=4.8, height=3.6):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error

    class _Figure(Figure):
        # A figure made without pyplot has no notebook display of its own.
        def _repr_png_(self):
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    figure = _Figure(figsize=(width * columns, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _history_dict(history):
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict) or not logs:
        raise TypeError(
            "Pass the `History` that `fit` returns (or its `.history` "
            f"dict). Received: history={history!r}"
        )
    return logs


# Suffixes of a distiller's logged schedules (`<term>_<hyperparameter>`),
# for a History dict that does not say which values are schedules.
_SCHEDULE_SUFFIXES = ("_xi", "_weight", "_temperature", "_beta")


def _schedule_names(history, logs, hyperparameters):
    if hyperparameters is not None:
        unknown = sorted(set(hyperparameters) - set(logs))
        if unknown:
            raise ValueError(
                f"{unknown} are not in the history, which holds "
                f"{sorted(logs)}. Received: hyperparameters={hyperparameters}"
            )
        return list(hyperparameters)
    names = getattr(getattr(history, "model", None), "schedule_names", None)
    if names is not None:
        return [name for name in names if name in logs]
    return [
        key
        for key in logs
        if key.endswith(_SCHEDULE_SUFFIXES)
        and not key.endswith("loss")
        and f"val_{key}" not in logs
    ]


def history(history, hyperparameters=None):
    """Plots a `fit` history, each quantity beside what it compares with.

    Up to four panels, against the epoch:

    - "Training objective": `loss` (the mixed objective), `supervised_loss`
      and each term's `<term>_loss`, on the scale the optimizer sees;
    - "Validation loss": `val_loss` and the other `val_` losses, which a
      distiller computes on the student alone (its compiled loss), so they
      are not drawn beside the mixed objective;
    - "Metrics": each metric (solid) and its `val_` counterpart (dashed, the
      same colour);
    - "Schedules": the scheduled hyperparameters (`distillation_xi`, ...),
      on their own axis, whatever their range.

    Args:
        history: The `keras.callbacks.History` returned by `fit`, or its
            `.history` dict.
        hyperparameters: Names of the logged schedules. Defaults to `None`:
            those of the History's distiller, or, for a dict, the values
            named `<term>_xi`, `_weight`, `_temperature` or `_beta` that
            validation does not log.

    Returns:
        A `matplotlib.figure.Figure` with one axes per panel that has
        values, titled as above; each line's label is the History key it
        draws.

    Example:

    ```python
    fit = distiller.fit(x, y, validation_data=(x_val, y_val), epochs=10)
    keras_selfdistill.plots.history(fit).savefig("history.png")
    ```
    """
    logs = _history_dict(history)
    schedules = _schedule_names(history, logs, hyperparameters)
    losses = [k for k in logs if k.endswith("loss")]
    metrics = [k for k in logs if k not in losses and k not in schedules]
    panels = [
        ("Training objective", [k for k in losses if not k.startswith("val_")]),
        ("Validation loss", [k for k in losses if k.startswith("val_")]),
        ("Metrics", metrics),
        ("Schedules", schedules),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    figure, axes_list = _figure(len(panels))
    colours = {}
    for axes, (title, keys) in zip(axes_list, panels):
        for key in keys:
            base = key[len("val_") :] if key.startswith("val_") else key
            values = np.asarray(logs[key], dtype="float64")
            colour = colours.setdefault(base, f"C{len(colours) % 10}")
            axes.plot(
                np.arange(1, len(values) + 1),
                values,
                label=key,
                color=colour,
                linestyle="--" if key.startswith("val_") else "-",
            )
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.legend(fontsize="small")
    return figure


def reliability_diagram(metric, title=None):
    """Plots accuracy against confidence per bin of a calibration metric.

    Bars: each bin's accuracy; the diagonal: perfect calibration; the gap
    between a bar and the diagonal, weighted by the bin's share of samples,
    sums to the expected calibration error shown in the title.

    Args:
        metric: A `keras_selfdistill.metrics.ExpectedCalibrationError`
            after `update_state` (or after `evaluate` on a model compiled
            with it: `model.metrics`).
        title: Title; the ECE in percent follows it in parentheses.
            Defaults to `None` (the ECE alone).

    Returns:
        A `matplotlib.figure.Figure`; its axes hold one bar per bin (height
        the bin's accuracy, empty bins at 0) with its sample count above
        it, and the diagonal.

    Example:

    ```python
    ece = keras_selfdistill.metrics.ExpectedCalibrationError()
    ece.update_state(y_test, student.predict(x_test))
    keras_selfdistill.plots.reliability_diagram(ece).savefig("ece.png")
    ```
    """
    if not isinstance(metric, ExpectedCalibrationError):
        raise TypeError(
            "Pass a `keras_selfdistill.metrics.ExpectedCalibrationError`. "
            f"Received: metric={metric!r}"
        )
    bins = metric.bins()
    if bins["counts"].sum() == 0:
        raise ValueError(
            "The metric has seen no samples: call `update_state` (or "
            "`evaluate`) before plotting it."
        )
    figure, (axes,) = _figure(1, width=4.2, height=4.2)
    width = 1.0 / len(bins["counts"])
    accuracy = np.nan_to_num(bins["accuracy"])
    axes.bar(
        bins["lower"],
        accuracy,
        width=width,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    # How many samples each bar stands for: a bin of 3 says little.
    for lower, height, count in zip(bins["lower"], accuracy, bins["counts"]):
        if count:
            axes.text(
                lower + width / 2,
                min(height + 0.02, 0.93),
                f"{int(count)}",
                ha="center",
                fontsize="x-small",
            )
    axes.plot([0, 1], [0, 1], color="gray", linestyle="--", label="ideal")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (numbers: samples per bin)")
    axes.set_ylabel("accuracy")
    ece = f"ECE {float(metric.result()) * 100:.2f}%"
    axes.set_title(ece if title is None else f"{title} ({ece})")
    axes.legend(loc="upper left", fontsize="small")
    return figure


def exit_accuracy(results, exit_names=None):
    """Plots each exit's test accuracy, shallowest first, then the student.

    Args:
        results: The dict `evaluate(..., return_dict=True)` returns for a
            `Distiller` with auxiliary exits (`"<exit>_accuracy"` keys and
            `"accuracy"` for the student's own output).
        exit_names: The exits in depth order. Defaults to `None` (the
            `"<exit>_accuracy"` keys in the dict's order).

    Returns:
        A `matplotlib.figure.Figure` with one bar per exit and one for the
        student (`"output"`).

    Example:

    ```python
    results = distiller.evaluate(x_test, y_test, return_dict=True)
    keras_selfdistill.plots.exit_accuracy(results)
    ```
    """
    if "accuracy" not in results:
        raise ValueError(
            "`results` needs the student's `accuracy`: compile the "
            "distiller with `metrics=['accuracy']`. Received keys: "
            f"{sorted(results)}"
        )
    if exit_names is None:
        exit_names = [
            k[: -len("_accuracy")]
            for k in results
            if k.endswith("_accuracy") and not k.startswith("val_")
        ]
    missing = [n for n in exit_names if f"{n}_accuracy" not in results]
    if missing or not exit_names:
        raise ValueError(
            "No accuracy for exits "
            f"{missing or 'at all'} in `results`, which holds "
            f"{sorted(results)}. Evaluate the distiller that has the exits."
        )
    names = list(exit_names) + ["output"]
    values = [results[f"{n}_accuracy"] for n in exit_names]
    values.append(results["accuracy"])
    figure, (axes,) = _figure(1)
    bars = axes.bar(names, np.asarray(values, dtype="float64") * 100)
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel("test accuracy %")
    axes.set_title("Accuracy per exit")
    return figure


def early_exit_tradeoff(table):
    """Plots accuracy against mean exit depth and latency, per threshold.

    Args:
        table: The rows of `keras_selfdistill.exits.early_exit_tradeoff`:
            dicts with `threshold`, `accuracy`, `mean_depth` and
            `latency` (seconds per sample), plus one row with threshold
            `None` for the full student.

    Returns:
        A `matplotlib.figure.Figure` with two axes (accuracy against mean
        depth; accuracy against milliseconds per sample), one point per
        threshold, labelled with it, and the full student as a star.

    Example:

    ```python
    table = keras_selfdistill.exits.early_exit_tradeoff(
        distiller.exits, x_test, y_test)
    keras_selfdistill.plots.early_exit_tradeoff(table)
    ```
    """
    needed = {"threshold", "accuracy", "mean_depth", "latency"}
    if not table or any(not needed <= set(row) for row in table):
        raise ValueError(
            f"Each row needs {sorted(needed)}; build the table with "
            "`keras_selfdistill.exits.early_exit_tradeoff`."
        )
    early = [row for row in table if row["threshold"] is not None]
    full = [row for row in table if row["threshold"] is None]
    figure, (by_depth, by_latency) = _figure(2)
    for axes, key, scale, label in (
        (by_depth, "mean_depth", 1.0, "mean exit depth (exits passed)"),
        (by_latency, "latency", 1000.0, "ms per sample"),
    ):
        xs = [row[key] * scale for row in early]
        ys = [row["accuracy"] * 100 for row in early]
        axes.plot(xs, ys, marker="o", label="early exit")
        for row, x, y in zip(early, xs, ys):
            axes.annotate(
                f"{row['threshold']:g}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="small",
            )
        for row in full:
            axes.plot(
                row[key] * scale,
                row["accuracy"] * 100,
                marker="*",
                markersize=12,
                linestyle="none",
                label="full student",
            )
        axes.set_xlabel(label)
        axes.set_ylabel("test accuracy %")
        axes.legend(fontsize="small")
    figure.suptitle("Early exit: accuracy against cost")
    return figure
