"""Fused LM distillation of sharded KerasHub models; run as a script.

`python -m tests.sharded_run OUT.npz` with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=8`. Trains a tiny Gemma
student from a tiny Gemma teacher with `FusedDistillation` three ways:

- `one`: one device;
- `sharded`: both models under `keras.distribution.ModelParallel` over a
  2 × 4 mesh (`batch` × `model`) with KerasHub's own Gemma layout map (the
  vocabulary of both tied heads split over `model`, the hidden width over
  `batch`);
- `teacher_sharded`: the teacher sharded the same way except for its
  vocabulary (its embedding split over its width only), the student
  replicated;
- `mismatch`: the teacher's vocabulary split, the student replicated,
  which the term refuses (the message is written).

Writes each run's History and the student's weights.
"""

import sys

import numpy as np

VOCABULARY = 64
LAYOUTS = ("one", "sharded", "teacher_sharded", "mismatch")


def _gemma(keras_hub, layers, seed, keras):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=layers,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=4,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def data(n=16, length=9):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCABULARY, size=(n, length + 1)).astype("int32")
    mask = np.arange(length + 1) < rng.integers(4, length + 2, size=(n, 1))
    ids[~mask] = 0
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], mask[:, 1:].astype("float32")


def distributions(keras, keras_hub, layout):
    """`(teacher's, student's, fit's)` distributions, `None` for none."""
    if layout == "one":
        return None, None, None
    import jax

    mesh = keras.distribution.DeviceMesh(
        (2, 4), ["batch", "model"], devices=jax.devices()[:8]
    )
    gemma = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    sharded = keras.distribution.ModelParallel(
        layout_map=gemma, batch_dim_name="batch"
    )
    if layout == "sharded":
        return sharded, sharded, sharded
    replicated = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )
    if layout == "mismatch":
        return sharded, replicated, replicated
    # The teacher's embedding split over its width, not its vocabulary;
    # the student's weights replicated (an empty layout map).
    teacher_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    del teacher_map["token_embedding/embeddings"]
    teacher_map["token_embedding/embeddings"] = (None, "model")
    teacher = keras.distribution.ModelParallel(
        layout_map=teacher_map, batch_dim_name="batch"
    )
    return teacher, replicated, replicated


def run(layout):
    import keras
    import keras_hub

    import keras_selfdistill as ksd

    teacher_scope, student_scope, fit_scope = distributions(
        keras, keras_hub, layout
    )

    def build(scope, layers, seed):
        if scope is None:
            return _gemma(keras_hub, layers, seed, keras)
        with scope.scope():
            return _gemma(keras_hub, layers, seed, keras)

    teacher = build(teacher_scope, 2, 1)
    student = build(student_scope, 1, 2)
    keras.distribution.set_distribution(fit_scope)
    term = ksd.terms.FusedDistillation(
        teacher, temperature=2.0, xi=0.5, label_loss=True, chunk_size=12
    )
    try:
        distiller = ksd.Distiller(student, [term])
    except ValueError as error:
        keras.distribution.set_distribution(None)
        return {"error": np.asarray(str(error))}
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, weights = data()
    history = distiller.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
    ).history
    keras.distribution.set_distribution(None)
    result = {f"history/{k}": np.asarray(v) for k, v in history.items()}
    for i, variable in enumerate(distiller.student.weights):
        result[f"variable/{i}"] = np.asarray(
            keras.ops.convert_to_numpy(variable)
        )
    result["sharding"] = np.asarray(
        str(
            getattr(
                student.backbone.token_embedding.embeddings.value,
                "sharding",
                None,
            )
        )
    )
    return result


def main(out, *layouts):
    results = {}
    for layout in layouts or LAYOUTS:
        for key, value in run(layout).items():
            results[f"{layout}/{key}"] = value
    np.savez(out, **results)


if __name__ == "__main__":
    from tests import watchdog

    watchdog.arm()
    main(*sys.argv[1:])
