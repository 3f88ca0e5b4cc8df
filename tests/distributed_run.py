"""Trains every teacher and term on 1 and on 2 CPU devices; run as a script.

`python -m tests.distributed_run ENGINE OUT.npz` with ENGINE `mirrored`
(TensorFlow `MirroredStrategy` over 2 logical CPUs) or `data_parallel`
(JAX `keras.distribution.DataParallel` over 2 host devices). The devices
are split before the backend starts, so the caller sets `KERAS_BACKEND`
and, for JAX, `JAX_ENV` (`XLA_FLAGS=--xla_force_host_platform_device_count=2`
and the thread pool's size).
Writes, per configuration and device count, the History and every
variable, plus every replica's copy of each prediction bank.
"""

import sys

import numpy as np

KINDS = (
    "frozen",
    "ensemble",
    "ema",
    "snapshot",
    "random_init",
    "past_predictions",
    "exits",
    "families",
    "sequence",
    "sequence_kd",
    "sequence_fused",
    "diffusion",
    "consistency",
    "reflow",
    "distribution_matching",
)
# The configurations that train a diffusion model.
DIFFUSION = ("diffusion", "consistency", "reflow", "distribution_matching")
# The JAX engine's 2 host devices, as the tests and the stress script start
# them. XLA's CPU client runs every device's part of a program, and every
# launch, on one pool of max(cores, devices) threads: 2 on a 2-core
# machine. There a device's part of an all-reduce waits in one thread for
# the other's, while the other thread, launching the other device's part,
# waits for that device's queue of computations to drain (at most 32 in
# flight), which needs a free thread: the run hangs (issue 32; the stacks
# are in benchmarks/RESULTS.md). PJRT_NPROC sizes the pool: with 4
# threads, the at most 3 that can wait (1 in the all-reduce, 2 launching)
# leave one to drain the queues. The collective timeouts stay long: a
# device thread can be minutes late on a loaded 2-core CI machine.
JAX_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=2"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    " --xla_cpu_collective_timeout_seconds=600"
)
JAX_ENV = {"XLA_FLAGS": JAX_XLA_FLAGS, "PJRT_NPROC": "4"}
BATCH = 8
VOCABULARY = 8
SEQUENCE = 5


def _split_devices(engine):
    if engine == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )


def _model(keras, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h1 = keras.layers.Dense(8, activation="relu", name="h1")(inputs)
    h2 = keras.layers.Dense(8, activation="relu", name="h2")(h1)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h2))


def _diffusion_model(keras, ksd, seed):
    from tests.diffusion import reference

    keras.utils.set_random_seed(seed)
    model = ksd.diffusion.unet((4, 4, 1), widths=(3, 4), embedding_dim=4)
    # The zero-initialised convolutions would make both models' first
    # outputs equal.
    reference.randomise_zero_layers(keras, model, seed, stddev=0.1)
    return model


def _language_model(keras, seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, 6)(tokens)
    h = keras.layers.Dense(8, activation="relu")(h)
    return keras.Model(tokens, keras.layers.Dense(VOCABULARY)(h))


_CACHES = {}


def cached(keras, ksd, kind, k=None):
    """A `Cached` teacher: `_model(keras, 1)`'s outputs on `data`'s inputs.

    Written once per process and kind, in float32 whatever the policy, at
    T = 2 (the temperature of the terms that read it).
    """
    if kind not in _CACHES:
        import tempfile

        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            directory = tempfile.mkdtemp(prefix=f"harness_{kind}_")
            ksd.cache.write_teacher_outputs(
                _model(keras, 1),
                ksd.data.with_sample_ids(_arrays()[0]),
                directory,
                num_samples=32,
                kind=kind,
                k=k,
                temperature=2.0,
                shard_size=12,
                verbose=0,
            )
        finally:
            keras.config.set_dtype_policy(policy)
        _CACHES[kind] = directory
    return ksd.teachers.Cached(_CACHES[kind])


def prepare(keras, ksd, kinds):
    """Writes the caches the configurations read, once per process.

    Before any model is built: writing runs a teacher and reseeds, which
    would otherwise change the random draws of the first run only.
    """
    for kind in kinds:
        if kind == "ensemble":
            cached(keras, ksd, "dense")
        if kind in _SPARSE:
            cached(keras, ksd, *_SPARSE[kind])


def distiller(keras, ksd, kind, jit_compile=False):
    prepare(keras, ksd, [kind])
    language = kind.startswith("sequence")
    student = (_language_model if language else _model)(keras, 2)
    if kind in DIFFUSION:
        student = _diffusion_model(keras, ksd, 2)
    teachers = {
        "frozen": lambda: _model(keras, 1),
        # A cached teacher's dense outputs as a member.
        "ensemble": lambda: ksd.teachers.Ensemble(
            [cached(keras, ksd, "dense"), _model(keras, 3)],
            weights=[0.3, 0.7],
        ),
        "ema": lambda: ksd.teachers.EMA(momentum=0.8),
        "snapshot": lambda: ksd.teachers.Snapshot(freq=1, keep=2),
        "random_init": lambda: ksd.teachers.RandomInit(),
        "past_predictions": lambda: ksd.teachers.PastPredictions(
            32, 3, dtype="float32"
        ),
    }
    if kind == "exits":
        terms = [ksd.terms.AuxiliaryExits(["h1", "h2"], weight=0.5)]
    elif kind == "families":
        # Feature distillation, decoupled KD and two-view consistency in
        # one configuration: one harness run per backend for all three.
        # The strong view is deterministic: replicas draw different random
        # augmentations, which one device would not reproduce. Logits and
        # features come from one teacher model, shared by the two terms.
        teacher = _model(keras, 1)
        terms = [
            ksd.terms.Distillation(
                teacher,
                loss="dkd",
                temperature=2.0,
                weight=ksd.schedules.LinearRampUp(ramp_up_epochs=2, start=0.5),
                beta=2.0,
            ),
            ksd.terms.FeatureDistillation(
                teacher,
                student_layer="h1",
                teacher_layer="h2",
                projector="orthogonal",
                weight=0.5,
            ),
            ksd.terms.Consistency(
                keras.layers.Rescaling(0.5, offset=0.1),
                temperature=0.5,
                dynamic_weight=1.0,
                weight=0.8,
            ),
        ]
    elif kind == "sequence":
        # Token-level KD over padded sequences, the mean over real tokens
        # of the global batch, evaluated three positions at a time (the
        # chunked loop, whose last chunk overlaps on JAX).
        term = ksd.terms.Distillation(
            _language_model(keras, 1),
            loss="jsd",
            beta=0.3,
            temperature=2.0,
            reduction="mean_with_sample_weight",
        )
        term._chunk_elements = 3 * VOCABULARY
        # TAID beside it, its coefficient updated from the loss over real
        # tokens of the global batch (alpha 0.3 to move it fast).
        taid = ksd.terms.TAID(
            _language_model(keras, 3),
            total_steps=12,
            alpha=0.3,
            momentum=0.5,
            weight=0.5,
            reduction="mean_with_sample_weight",
        )
        # The student's own greedy continuations (GKD). Every step, and
        # greedy: TensorFlow draws other random numbers under XLA.
        terms = [term, taid, ksd.terms.OnPolicy(2, temperature=0)]
    elif kind == "diffusion":
        # Progressive distillation: a 4-step DDIM teacher, a 2-step
        # student, noise and times drawn for the global batch.
        terms = [
            ksd.terms.Denoising(
                ksd.teachers.DDIM(_diffusion_model(keras, ksd, 1), 4),
                seed=5,
            )
        ]
    elif kind == "consistency":
        # Consistency distillation: Heun steps of a frozen teacher, an
        # EMA target network, noise and steps drawn for the global batch.
        terms = [
            ksd.terms.ConsistencyDistillation(
                _diffusion_model(keras, ksd, 1),
                num_scales=6,
                target=ksd.teachers.EMA(0.8),
                distance="pseudo_huber",
                seed=5,
            )
        ]
    elif kind == "distribution_matching":
        # DMD2: a fake score trained by its own optimizer, two updates per
        # step, on generator samples drawn for the global batch; DMD's
        # regression loss on noise–image pairs beside it.
        terms = [
            ksd.terms.DistributionMatching(
                _diffusion_model(keras, ksd, 1),
                fake_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                fake_updates=2,
                regression_weight=0.25,
                seed=5,
            )
        ]
    elif kind == "reflow":
        # A one-step student regressed on noise-image pairs.
        terms = [ksd.terms.Reflow()]
    elif kind == "sequence_fused":
        # The loss fused with the head: KL and the label cross-entropy
        # with ξ, three positions projected at a time, the mean over real
        # tokens of the global batch.
        terms = [
            ksd.terms.FusedDistillation(
                _language_model(keras, 1),
                temperature=2.0,
                xi=0.5,
                label_loss=True,
                chunk_size=3,
                reduction="mean_with_sample_weight",
            )
        ]
    elif kind == "sequence_kd":
        terms = [
            ksd.terms.SequenceKD(_language_model(keras, 1), prompt_length=3)
        ]
    elif kind == "past_predictions":
        terms = [
            ksd.terms.Distillation(
                teachers[kind](),
                xi=ksd.schedules.LinearRampUp(ramp_up_epochs=2, end=0.8),
            )
        ]
    else:
        terms = [
            ksd.terms.Distillation(
                teachers[kind](), temperature=2.0, weight=0.7
            )
        ]
    if kind in _SPARSE:
        # RS-KD's sampled targets, and top-k ones, from a cache.
        sparse, k = _SPARSE[kind]
        terms.append(
            ksd.terms.Distillation(
                cached(keras, ksd, sparse, k),
                temperature=2.0,
                weight=0.5,
                name=f"{sparse}_distillation",
            )
        )
    distiller = ksd.Distiller(student, terms)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        # GKD (the sequence configuration) minimises the divergence alone;
        # a diffusion model regresses on its term's targets.
        loss=None
        if kind in ("sequence", "sequence_fused", *DIFFUSION)
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return distiller


# Configurations with a second term on a cached teacher's sparse targets.
_SPARSE = {"frozen": ("sampled", 4), "random_init": ("top_k", 2)}
# Configurations whose data carry sample ids.
_WITH_IDS = ("past_predictions", "ensemble", *_SPARSE)


def _arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    w = rng.uniform(0.0, 2.0, size=32).astype("float32")
    return x, y, w, rng


def data(ksd, kind):
    import tensorflow as tf

    x, y, w, rng = _arrays()
    if kind.startswith("sequence"):
        # Ragged lengths: each replica's half of a batch holds a different
        # number of real tokens.
        x = rng.integers(0, VOCABULARY, size=(32, SEQUENCE)).astype("int32")
        y = rng.integers(0, VOCABULARY, size=(32, SEQUENCE))
        lengths = rng.integers(1, SEQUENCE + 1, size=(32, 1))
        w = (np.arange(SEQUENCE) < lengths).astype("float32")
    if kind in DIFFUSION:
        images = rng.uniform(-1, 1, size=(32, 4, 4, 1)).astype("float32")
        if kind in ("reflow", "distribution_matching"):
            noise = rng.normal(size=images.shape).astype("float32")
            pairs = tf.data.Dataset.from_tensor_slices((noise, images))
            return pairs.batch(BATCH)
        return tf.data.Dataset.from_tensor_slices(images).batch(BATCH)
    data = tf.data.Dataset.from_tensor_slices((x, y, w))
    if kind in _WITH_IDS:
        data = ksd.data.with_sample_ids(data)
    return data.batch(BATCH)


def _replica_copies(variable, engine):
    value = variable.value
    if engine == "mirrored":
        return [np.asarray(v) for v in getattr(value, "values", [value])]
    return [np.asarray(shard.data) for shard in value.addressable_shards]


def run(engine, devices, kinds=KINDS):
    import keras

    import keras_selfdistill as ksd

    results = {}
    # The caches are written before any strategy or distribution is set.
    prepare(keras, ksd, kinds)
    if engine == "mirrored":
        import tensorflow as tf

        # One strategy for all runs: several MirroredStrategy objects in
        # one process draw clashing collective keys.
        strategy = (
            tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
            if devices == 2
            else tf.distribute.OneDeviceStrategy("/cpu:0")
        )
    for kind in kinds:
        if engine == "mirrored":
            with strategy.scope():
                model = distiller(keras, ksd, kind)
        else:
            import jax

            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=jax.devices()[:devices])
            )
            model = distiller(keras, ksd, kind)
        history = model.fit(data(ksd, kind), epochs=3, verbose=0).history
        for key, values in history.items():
            results[f"{kind}/history/{key}"] = np.asarray(values)
        variables = model.variables + model.optimizer.variables
        for i, variable in enumerate(variables):
            results[f"{kind}/variable/{i}"] = np.asarray(
                keras.ops.convert_to_numpy(variable)
            )
        for teacher in model.teachers:
            if getattr(teacher, "bank", None) is not None:
                copies = _replica_copies(teacher.bank, engine)
                results[f"{kind}/bank_copies"] = np.stack(copies)
    return results


def main(engine, out, *kinds):
    _split_devices(engine)
    results = {}
    for devices in (1, 2):
        for key, value in run(engine, devices, kinds or KINDS).items():
            results[f"{devices}/{key}"] = value
    np.savez(out, **results)


if __name__ == "__main__":
    from tests import watchdog

    watchdog.arm()
    main(*sys.argv[1:])
