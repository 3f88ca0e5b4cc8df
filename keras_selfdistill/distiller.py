import inspect

import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill import pipeline
from keras_selfdistill._forward import OUTPUT
from keras_selfdistill._forward import Forward
from keras_selfdistill._term_metrics import LossMean
from keras_selfdistill._term_metrics import TermMetrics
from keras_selfdistill._term_metrics import unscale_for_distribution
from keras_selfdistill.batch import select_input
from keras_selfdistill.callbacks.training_events import NO_STEP
from keras_selfdistill.callbacks.training_events import TrainingEvents
from keras_selfdistill.pruning import quantized
from keras_selfdistill.terms.composition import SUPERVISED_LOSS
from keras_selfdistill.terms.composition import compose


def _first_leaf(structure):
    return next(
        leaf for leaf in keras.tree.flatten(structure) if leaf is not None
    )


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Distiller(keras.Model):
    """Trains a student with distillation terms inside plain `model.fit`.

    The distiller is a `keras.Model` wrapping the student. Its objective,
    in `compute_loss`, is the compiled supervised loss plus the losses of
    every model that ran in the step (the student's and the terms' own
    layers' `add_loss`, activity and weight regularizers, on both
    backends) plus
    `Σ weight · term`; a term with `xi` set scales the supervised loss by
    `1 − ξ` instead, except for samples its teacher has no target for yet,
    which keep their label at full weight. `train_step` is Keras's
    own followed by the teachers' updates, so loss scaling, mixed precision,
    distribution strategies and every callback work unchanged.

    - Each term's unweighted loss is a metric `<term name>_loss` (progress
      bar, History, TensorBoard, `EarlyStopping(monitor=...)`), averaged
      over the epoch like Keras's `loss`. With terms and a compiled loss,
      `supervised_loss` is the supervised part as it enters `loss`
      (already multiplied by `1 − ξ` where a term sets `xi`), and every
      hyperparameter given as a schedule logs its effective value as
      `<term name>_<hyperparameter>` (`distillation_xi`,
      `distillation_temperature`), the epoch's mean over its steps.
    - `evaluate` and `predict` run the student alone: no teacher runs at
      validation, and validation metrics measure the student.
    - Terms that read more than the final output (intermediate layers,
      heads of their own, a second view of the batch) declare it through
      `Term.taps`, `Term.view` and `Term.forward`; the student still runs
      once per step. Then `distiller(x)` returns a dict with the logits
      under `"output"` and what the terms' layers computed, a term's own
      metrics (e.g. each exit's accuracy) show beside its loss, and the
      models a term publishes are attributes (`distiller.exits` of
      `AuxiliaryExits`). `predict` still runs the student alone.
    - `fit` without labels trains from the teachers alone (compile without
      a `loss` then).
    - `sample_weight` and `class_weight` weight every term as they weight
      the compiled loss.
    - `distiller.student` is the plain Keras student to save and ship.

    Args:
        student: The `keras.Model` to train. Its outputs are the
            distiller's outputs.
        terms: List of `keras_selfdistill.terms.Term`s. Defaults to `()`
            (plain supervised training).
        input_key: Key of the student's input when the batch inputs are a
            dict that also holds a teacher's privileged input. Defaults to
            `None` (the student reads the whole inputs).
        check_data: Whether `fit` checks the training data (finite inputs,
            labels in range, sample ids): once for NumPy arrays, and per
            batch in the `tf.data` pipeline, on the host beside training,
            over the dataset's first pass (`fit`), and, at the end of each
            epoch, that the training loss is finite. Defaults to `True`;
            `False` skips these checks, e.g. for large image batches on a
            CPU-bound input pipeline.
        name: Name of the model. Defaults to `"distiller"`.

    Example:

    ```python
    distiller = keras_selfdistill.Distiller(
        student,
        terms=[keras_selfdistill.terms.Distillation(
            teacher=big_model, temperature=4.0, weight=0.9)],
    )
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    distiller.fit(x_train, y_train, epochs=10,
                  callbacks=[keras.callbacks.EarlyStopping(
                      monitor="distillation_loss", patience=3)])
    distiller.student.save("student.keras")
    ```
    """

    def __init__(
        self,
        student,
        terms=(),
        input_key=None,
        check_data=True,
        name=None,
        **kwargs,
    ):
        super().__init__(name=name or "distiller", **kwargs)
        if not isinstance(student, keras.Model):
            raise TypeError(
                "The student must be a `keras.Model`. "
                f"Received: student={student!r}"
            )
        composition = compose(student, terms)
        for term in terms:
            term._bind(self)
        self.student = student
        self.terms = list(terms)
        # Not tracked: it holds the student's own layers, saved with it.
        object.__setattr__(
            self,
            "_forward",
            Forward(student, terms, composition.output_key or OUTPUT),
        )
        for term in terms:
            for name, model in term.exports.items():
                if hasattr(self, name):
                    raise ValueError(
                        f"Term '{term.name}' publishes a model as "
                        f"`distiller.{name}`, which the distiller (or another "
                        "term) already has. Keep one such term per "
                        f"distiller. Received: {name!r}"
                    )
                setattr(self, name, model)
        self.input_key = input_key
        self.check_data = bool(check_data)
        self.epoch = keras.Variable(
            0, dtype="int32", trainable=False, name="epoch"
        )
        self._term_metric_names = composition.loss_metrics
        self.term_metrics = TermMetrics(
            [LossMean(n) for n in self._term_metric_names],
            name="term_metrics",
        )
        self._schedules = composition.schedules
        self.schedule_metrics = TermMetrics(
            [LossMean(n, direction=None) for _, _, n in self._schedules],
            name="schedule_metrics",
        )
        self._own_metric_names = [
            (term, name, f"{term.name}_{name}")
            for term in terms
            if term.trains_own
            for name in term.own_metrics
        ]
        self.own_metrics = TermMetrics(
            [LossMean(logged) for _, _, logged in self._own_metric_names],
            name="own_metrics",
        )
        # What the terms' own updates returned, while a step is traced.
        self._own_values = None
        self.supervised_metrics = TermMetrics(
            [LossMean(SUPERVISED_LOSS)] if terms else [],
            name="supervised_metrics",
        )
        self.built = True

    @property
    def schedule_names(self):
        """The logged names of the hyperparameters given as schedules
        (`<term>_<hyperparameter>`), which `keras_selfdistill.plots.history`
        draws on their own axis."""
        return [name for _, _, name in self._schedules]

    @property
    def trained_weights(self):
        """The student's weights and the terms' trainable ones.

        What the training changes (BatchNorm statistics included):
        `keras.callbacks.TensorBoard` draws the histograms of these, not of
        the frozen teachers' unchanged copies.
        """
        return list(self.student.weights) + [
            weight for term in self.terms for weight in term.trainable_weights
        ]

    @property
    def _loss_terms(self):
        return [term for term in self.terms if term.has_loss]

    def call(self, inputs, training=None):
        if isinstance(inputs, dict):
            inputs = select_input(inputs, self.input_key, "The student")
        return self._forward(inputs, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        outputs = y_pred
        if self._forward.extended:
            # No logits in the training step of a term that computes the
            # output layer itself.
            y_pred = outputs.get(OUTPUT)
        if y is None and _internals.compiled_loss(self) is not None:
            raise ValueError(
                "The distiller was compiled with a loss but the data has no "
                "labels. For label-free distillation (teacher targets only) "
                "compile without `loss`; otherwise pass labels to `fit`."
            )
        # The losses of what ran in the forward pass (student, terms' layers)
        # and the regularizers of every trainable weight (projections too),
        # read before the teachers run so that theirs stay out. On JAX
        # Keras hands the forward's losses over through `self.losses`.
        losses = [ops.sum(loss) for loss in self.losses]
        terms = self._loss_terms if training else []
        supervised = _internals.compiled_loss(self) is not None
        if not supervised and not terms and not losses:
            if not training:
                return ops.zeros(())
            raise ValueError(
                "Nothing to minimise: no compiled `loss` (or no labels) and "
                "no distillation terms. Compile with a `loss` or add terms."
            )
        label_scale = None
        # A distiller whose terms add no loss (a batch-rewriting term
        # alone: SequenceKD) still reports its supervised part.
        tracked = training and bool(self.supervised_metrics.metrics)
        if terms or tracked:
            step = self._step()
            batch_size = ops.shape(_first_leaf(x))[0]
        for term, tracker in zip(terms, self.term_metrics.metrics):
            if term.computes_output:
                objective, value, labels = term.compute_objective(
                    x, y, outputs, sample_weight, step, self.epoch
                )
                tracker.add_batch(unscale_for_distribution(value), batch_size)
                losses.append(objective)
                if labels is not None and tracked:
                    self.supervised_metrics.metrics[0].add_batch(
                        unscale_for_distribution(labels), batch_size
                    )
                continue
            value, mask = term.compute_loss_and_mask(
                x,
                y,
                outputs if term.reads_forward else y_pred,
                sample_weight,
                step,
                self.epoch,
            )
            tracker.add_batch(unscale_for_distribution(value), batch_size)
            weight = term.hyperparameter("weight", step, self.epoch)
            factor, scale = term.mixing(step, self.epoch, mask)
            if scale is not None:
                label_scale = scale
            losses.append(weight * factor * value)
        for value, tracker in zip(
            self._own_values if terms and self._own_values else [],
            self.own_metrics.metrics,
        ):
            tracker.add_batch(unscale_for_distribution(value), batch_size)
        for (term, name, _), tracker in zip(
            self._schedules if terms else [], self.schedule_metrics.metrics
        ):
            tracker.add_batch(
                term.hyperparameter(name, step, self.epoch), batch_size
            )
        if supervised:
            losses.append(
                self._supervised_loss(y, y_pred, sample_weight, label_scale)
            )
            if tracked:
                self.supervised_metrics.metrics[0].add_batch(
                    unscale_for_distribution(losses[-1]), batch_size
                )
        # Terms compute in float32; a float64 student (floatx) sums in its
        # own precision, as plain Keras does.
        dtype = keras.backend.floatx()
        total = ops.cast(losses[0], dtype)
        for loss in losses[1:]:
            total = total + ops.cast(loss, dtype)
        return total

    def _supervised_loss(self, y, y_pred, sample_weight, label_scale):
        if label_scale is None:
            return _internals.compiled_loss(self)(y, y_pred, sample_weight)
        if len(label_scale.shape) == 0:
            loss = _internals.compiled_loss(self)(y, y_pred, sample_weight)
            return ops.cast(label_scale, loss.dtype) * loss
        # Per sample: through the sample weights, so that the compiled
        # loss reduces it exactly as it reduces any other weighting.
        rank = len(y_pred.shape) - 1
        weights = label_scale
        if rank > 1:
            # Sequences: one scale per sample, on every position.
            weights = ops.ones(ops.shape(y_pred)[:-1], "float32") * (
                ops.reshape(
                    label_scale, ops.shape(label_scale) + (1,) * (rank - 1)
                )
            )
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, "float32")
            while len(sample_weight.shape) > rank:
                sample_weight = ops.squeeze(sample_weight, -1)
            while len(sample_weight.shape) < rank:
                sample_weight = ops.expand_dims(sample_weight, -1)
            weights = weights * sample_weight
        return _internals.compiled_loss(self)(y, y_pred, weights)

    @property
    def teachers(self):
        """Every teacher of every term, those inside an ensemble included.

        The one traversal that the data checks, the teachers' hooks and the
        tests use, so a nested teacher gets everything a top-level one does.
        """
        leaves = [
            leaf
            for term in self.terms
            for teacher in term.teachers
            for leaf in teacher.walk()
        ]
        # A teacher that several terms share is one teacher: its hooks
        # (an EMA's update, a snapshot) run once.
        return list({id(leaf): leaf for leaf in leaves}.values())

    def _training_only_metrics(self):
        return (
            set(self._term_metric_names)
            | {name for _, _, name in self._schedules}
            | {name for _, _, name in self._own_metric_names}
            | {SUPERVISED_LOSS}
            | {
                m.name
                for t in self.terms
                for m in t.metrics
                if m.name not in t.validation_metrics
            }
        )

    @staticmethod
    def _without(logs, names):
        return {k: v for k, v in logs.items() if k not in names}

    def train_step(self, *args, **kwargs):
        if keras.backend.backend() == "jax":
            logs, state = self._stateless_train_step(*args, **kwargs)
            return self._hide_supervised(logs), state
        data = self._rewrite_batch(args[-1] if args else kwargs.get("data"))
        self._train_own(data)
        try:
            logs = super().train_step(data)
        finally:
            self._own_values = None
        self._update_teachers(data)
        return self._hide_supervised(logs)

    def _rewrite_batch(self, data):
        """The batch after the terms that replace it (on-policy samples)."""
        rewriting = [term for term in self.terms if term.rewrites_batch]
        if not rewriting:
            return data
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        for term in rewriting:
            x, y, sample_weight = term.rewrite_batch(x, y, sample_weight)
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def _train_own(self, data):
        """The updates of the terms' own models, before the student's.

        What they return is held for `compute_loss`, which adds it to
        their metrics inside Keras's step (where the metrics' state is).
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        values = {}
        for term in self.terms:
            if term.trains_own:
                returned = term.train_own(self.student, x, y, sample_weight)
                returned = returned or {}
                missing = set(term.own_metrics) - set(returned)
                if missing:
                    raise ValueError(
                        f"Term '{term.name}' declares `own_metrics` "
                        f"{sorted(term.own_metrics)} but its `train_own` "
                        f"returned no {sorted(missing)}."
                    )
                values[term.name] = returned
        self._own_values = [
            values[term.name][name] for term, name, _ in self._own_metric_names
        ]

    def _hide_supervised(self, logs):
        # Label-free distillation has no supervised part to report.
        if _internals.compiled_loss(self) is None and not any(
            term.supervises for term in self.terms
        ):
            return self._without(logs, {SUPERVISED_LOSS})
        return logs

    def _stateless_train_step(self, state, data):
        # JAX: Keras's step is a pure function of `state`. The rewrite and
        # the terms' own updates run the student (and their seeds) on the
        # state's values; the teachers' updates run on the stepped state;
        # what they assign goes back into the state.
        if any(term.rewrites_batch for term in self.terms):
            data, non_trainable = _internals.run_stateless(
                self, state, lambda: self._rewrite_batch(data)
            )
            state = (state[0], non_trainable, *state[2:])
        if any(term.trains_own for term in self.terms):
            _, non_trainable = _internals.run_stateless(
                self, state, lambda: self._train_own(data)
            )
            state = (state[0], non_trainable, *state[2:])
        self._traced_step = _internals.optimizer_step(self, state[2])
        try:
            logs, state = super().train_step(state, data)
        finally:
            self._traced_step = None
            self._own_values = None
        _, non_trainable = _internals.run_stateless(
            self, state, lambda: self._update_teachers(data)
        )
        return logs, (state[0], non_trainable, *state[2:])

    def _update_teachers(self, data):
        for teacher in self.teachers:
            teacher.update(data)

    def _step(self):
        """The optimizer step: completed updates before this one."""
        traced = getattr(self, "_traced_step", None)
        if traced is not None:
            return traced
        return self.optimizer.iterations if self.optimizer else 0

    def test_step(self, *args, **kwargs):
        result = super().test_step(*args, **kwargs)
        # JAX returns `(logs, state)`.
        logs, state = result if isinstance(result, tuple) else (result, None)
        logs = self._without(logs, self._training_only_metrics())
        return logs if state is None else (logs, state)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        outputs = y_pred
        if self._forward.extended:
            y_pred = outputs.get(OUTPUT)
        for term in self.terms:
            term.update_metrics(
                y, outputs if term.reads_forward else y_pred, sample_weight
            )
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def predict_step(self, *args):
        if not self._forward.extended:
            return super().predict_step(*args)
        # The student's output alone: no tap, view or head runs to predict.
        if keras.backend.backend() != "jax":
            return self._predict_final(*args)
        state, data = args
        outputs, _ = _internals.run_stateless(
            self, state, lambda: self._predict_final(data)
        )
        return outputs, state[1]

    def _predict_final(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict):
            x = select_input(x, self.input_key, "The student")
        return self._forward.final(x, training=False)

    def _refuse_evaluation(self, what):
        silent = [term.name for term in self.terms if not term.evaluates]
        if silent:
            raise ValueError(
                f"Terms {silent} run the student only on the batches they "
                "build in the training step, so there is no validation "
                "loss to compute on the data as given. Measure the model "
                "another way (a diffusion model by its samples: "
                "`keras_selfdistill.diffusion.sample`). Received: "
                f"{what}"
            )

    def evaluate(self, *args, **kwargs):
        self._refuse_evaluation("a call to `evaluate`")
        return super().evaluate(*args, **kwargs)

    def fit(self, *args, **kwargs):
        """Trains the student: `keras.Model.fit`'s arguments and return.

        The training data is checked first (`check_data`) and joined to
        the rows of teachers that declare `joins_rows` (cached outputs):
        `keras_selfdistill.pipeline`.
        A `tf.data` dataset of known size (a multiple of
        `steps_per_execution` batches), read for more than one epoch
        without `steps_per_epoch`, is checked over its first pass only:
        Keras reads that pass and then the dataset as given, repeated, from
        one iterator, with `steps_per_epoch` set to the dataset's size, so
        every epoch is still one pass, reshuffled as the dataset shuffles.
        On a small CPU a per-batch stage of the input pipeline costs about
        what a small student's step does (`benchmarks/pipeline_stages.py`).
        """
        arguments = (
            inspect.signature(keras.Model.fit)
            .bind(self, *args, **kwargs)
            .arguments
        )
        arguments.pop("self")
        self._refuse_silent_fit(arguments)
        arguments, callbacks = pipeline.fit_arguments(self, arguments)
        quantized.refuse_untrainable(self.student, callbacks)
        for callback in callbacks:
            # TensorBoard's histograms: the trained weights, not the
            # frozen teachers' (an unchanged copy every epoch).
            _internals.trained_histograms(callback)
        # First, so that a snapshot taken at an epoch's end is in the state
        # that BackupAndRestore or ModelCheckpoint save at the same moment.
        arguments["callbacks"] = [TrainingEvents(self)] + callbacks
        try:
            return super().fit(**arguments)
        except StopIteration as error:
            # JAX's trainer builds from the first batch and lets an empty
            # iterator's StopIteration through.
            raise ValueError(NO_STEP) from error
        except Exception as error:
            message = pipeline.pipeline_error(self, error)
            if message is None:
                raise
            raise ValueError(message) from error

    def _refuse_silent_fit(self, arguments):
        """Refuses what a term that builds its own batches, or computes the
        output layer itself, cannot serve."""
        fused = [term.name for term in self.terms if term.computes_output]
        compiled = _internals.compiled_metrics(self)
        if fused and (
            _internals.compiled_loss(self) is not None or compiled is not None
        ):
            raise ValueError(
                f"Term '{fused[0]}' computes the student's output layer "
                "itself, chunk by chunk, so the training step builds no "
                "logits for a compiled loss or metric to read. Compile the "
                "distiller without `loss` and `metrics`; the term computes "
                "the label cross-entropy itself (`label_loss=True`) and "
                "reports it as `supervised_loss`. Received: a compiled "
                + ("loss" if _internals.compiled_loss(self) else "metric")
            )
        silent = [term.name for term in self.terms if not term.evaluates]
        if not silent:
            return
        if _internals.compiled_loss(self) is not None:
            # Checked here: JAX's trainer builds a compiled loss by calling
            # the student on the data as given, which such a student cannot
            # take.
            raise ValueError(
                f"Terms {silent} build their own regression targets: "
                "compile the distiller without `loss`. Received: a compiled "
                "loss"
            )
        if arguments.get("validation_data") is not None:
            self._refuse_evaluation("validation_data")
        if arguments.get("validation_split"):
            self._refuse_evaluation(
                f"validation_split={arguments['validation_split']!r}"
            )

    def save(self, filepath, *args, **kwargs):
        if str(filepath).endswith((".h5", ".hdf5")):
            raise ValueError(
                "A distiller cannot be saved in Keras's legacy HDF5 format: "
                "the file would not load back (its terms and teachers are "
                "not HDF5 layers). Save it as `.keras`, save the student "
                "alone (`distiller.student.save(...)`), or only the weights "
                f"(`save_weights('*.weights.h5')`). Received: "
                f"filepath={str(filepath)!r}"
            )
        return super().save(filepath, *args, **kwargs)

    def get_config(self):
        # Keras marks an object it serializes twice (one teacher model in
        # two terms) in both configs, but its first config is copied into
        # its term's before the second is met, so a loaded file would build
        # two models, one without weights. A first pass meets every object
        # once, and the configs below then mark both places.
        for term in self.terms:
            keras.saving.serialize_keras_object(term)
        return _shared_marks_only(
            {
                "name": self.name,
                "student": keras.saving.serialize_keras_object(self.student),
                "terms": [
                    keras.saving.serialize_keras_object(t) for t in self.terms
                ],
                "input_key": self.input_key,
                "check_data": self.check_data,
            }
        )

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(
            config["student"]
        )
        config["terms"] = [
            keras.saving.deserialize_keras_object(t) for t in config["terms"]
        ]
        return cls(**config)


def _shared_marks_only(config):
    """`config` without the sharing marks of objects it holds once.

    The first pass of `Distiller.get_config` makes Keras mark every object
    of the terms; only those met twice are shared.
    """
    counts = {}

    def walk(value, visit):
        if isinstance(value, dict):
            visit(value)
            for item in value.values():
                walk(item, visit)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, visit)

    def count(node):
        if "shared_object_id" in node:
            key = node["shared_object_id"]
            counts[key] = counts.get(key, 0) + 1

    def strip(node):
        if counts.get(node.get("shared_object_id"), 2) < 2:
            del node["shared_object_id"]

    walk(config, count)
    walk(config, strip)
    return config
