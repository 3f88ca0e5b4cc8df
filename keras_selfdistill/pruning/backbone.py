"""Depth and width pruning of KerasHub transformer backbones."""

import keras
import numpy as np

from keras_selfdistill import _internals
from keras_selfdistill._arguments import check_positive_int


class _Family:
    """Where one family of KerasHub blocks keeps what pruning removes.

    `intermediate` and `heads` map a variable's path inside a block to
    the axis of the MLP's units or the attention's query heads; `kv_heads`
    the key and value heads' axes, pruned alike when there are as many as
    query heads. `units_per_config` is the MLP units per unit of the
    config's `intermediate_dim` (Gemma's gate and up projections each
    take half of it). `heads_config` is the config key of the query
    heads, or `None` where the config derives the head size from the
    number of heads and so cannot express fewer heads of the same size.
    """

    def __init__(
        self,
        intermediate,
        down,
        units_per_config=1,
        heads=None,
        kv_heads=None,
        heads_config=None,
        kv_heads_config=None,
    ):
        self.intermediate = intermediate
        self.down = down
        self.units_per_config = units_per_config
        self.heads = heads or {}
        self.kv_heads = kv_heads or {}
        self.heads_config = heads_config
        self.kv_heads_config = kv_heads_config


_FAMILIES = {
    # keras_hub.layers.TransformerDecoder (GPT-2): key_dim is
    # hidden_dim // num_heads.
    "TransformerDecoder": _Family(
        intermediate={
            "feedforward_intermediate_dense/kernel": 1,
            "feedforward_intermediate_dense/bias": 0,
            "feedforward_output_dense/kernel": 0,
        },
        down="feedforward_output_dense",
    ),
    "GemmaDecoderBlock": _Family(
        intermediate={
            "ffw_gating/kernel": 1,
            "ffw_gating_2/kernel": 1,
            "ffw_linear/kernel": 0,
        },
        down="ffw_linear",
        units_per_config=0.5,
        heads={
            "attention/query/kernel": 0,
            "attention/attention_output/kernel": 0,
        },
        kv_heads={"attention/key/kernel": 0, "attention/value/kernel": 0},
        heads_config="num_query_heads",
        kv_heads_config="num_key_value_heads",
    ),
}


def _family(backbone):
    blocks = getattr(backbone, "transformer_layers", None)
    config = backbone.get_config() if hasattr(backbone, "get_config") else {}
    if not blocks or "num_layers" not in config:
        raise TypeError(
            "`prune_backbone` prunes KerasHub transformer backbones (a "
            "`transformer_layers` list and `num_layers` in the config). "
            f"Received: backbone of type {type(backbone).__name__}"
        )
    name = type(blocks[0]).__name__
    if name not in _FAMILIES:
        raise ValueError(
            f"`prune_backbone` does not know where {name} blocks (of "
            f"{type(backbone).__name__}) keep their MLP units and heads; it "
            f"prunes {sorted(_FAMILIES)}. Received: {type(backbone).__name__}"
        )
    return _FAMILIES[name], blocks, config


def _relative(block, variable):
    return variable.path[len(block.name) + 1 :]


def _sizes(family, block):
    """`(MLP units, query heads, key/value heads)` of one block."""
    units = heads = kv_heads = None
    for variable in block.weights:
        path = _relative(block, variable)
        if path in family.intermediate:
            units = variable.shape[family.intermediate[path]]
        if path in family.heads:
            heads = variable.shape[family.heads[path]]
        if path in family.kv_heads:
            kv_heads = variable.shape[family.kv_heads[path]]
    return units, heads, kv_heads


def _sublayer(block, name):
    """The layer named `name` among `block`'s attributes, one level down
    or inside its attention layer."""
    stack = [block]
    while stack:
        layer = stack.pop()
        for value in vars(layer).values():
            if isinstance(value, keras.layers.Layer):
                if value.name == name:
                    return value
                if layer is block:
                    stack.append(value)
    raise ValueError(f"No layer named {name!r} in the block {block.name!r}.")


def backbone_scores(backbone, x=None, batch_size=8):
    """Scores of a KerasHub backbone's layers, MLP units and heads.

    With calibration inputs `x`, Minitron's activation-based importance:
    a layer's score is its Block Importance, `1 −` the mean cosine
    similarity between its input and output hidden states over the
    unpadded tokens (a layer that barely changes the stream matters
    least; ShortGPT's measure, which Minitron compares for depth); an MLP
    unit's, its mean absolute activation where the down projection reads
    it; a head's, the mean of the L2 norm of its attention output before
    the output projection (both over every token of `x`, padded ones
    included: the sublayers do not see the mask). Without `x`, weight
    magnitudes: the L1 norms of each unit's up and down projection
    weights and each head's query and output projection weights; depth
    needs `x`.

    Reference:

    - [Muralidharan et al., 2024](https://arxiv.org/abs/2407.14679)
      (Minitron, section 2.2)
    - [Men et al., 2024](https://arxiv.org/abs/2403.03853) (ShortGPT)

    Args:
        backbone: A KerasHub backbone of a supported family (GPT-2's
            `TransformerDecoder` blocks, Gemma's).
        x: The backbone's inputs (`{"token_ids", "padding_mask"}` arrays)
            for activation scores, or `None` for magnitudes. Defaults to
            `None`.
        batch_size: Sequences per forward pass. Defaults to `8`.

    Returns:
        `{"layers": (num_layers,), "intermediate": (num_layers, units),
        "heads": (num_layers, heads)}` NumPy arrays (no `"layers"` without
        `x`; no `"heads"` for a family whose heads cannot be pruned).

    Example:

    ```python
    scores = keras_selfdistill.pruning.backbone_scores(backbone, batch)
    smaller = keras_selfdistill.pruning.prune_backbone(
        backbone, num_layers=backbone.num_layers // 2, scores=scores)
    ```
    """
    family, blocks, _ = _family(backbone)
    check_positive_int("backbone_scores", "batch_size", batch_size)
    if x is None:
        return _magnitudes(family, blocks)
    return _activations(backbone, family, blocks, x, batch_size)


def _magnitudes(family, blocks):
    units, heads = [], []
    for block in blocks:
        unit_score, head_score = 0.0, 0.0
        for variable in block.weights:
            path = _relative(block, variable)
            value = np.abs(_internals.to_numpy(variable)).astype("float64")
            if path in family.intermediate:
                axis = family.intermediate[path]
                unit_score = unit_score + _per_index(value, axis)
            if path in family.heads:
                head_score = head_score + _per_index(value, family.heads[path])
        units.append(unit_score)
        heads.append(head_score)
    scores = {"intermediate": np.stack(units)}
    if family.heads_config:
        scores["heads"] = np.stack(heads)
    return scores


def _per_index(value, axis):
    moved = np.moveaxis(value, axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(axis=1)


def _activations(backbone, family, blocks, x, batch_size):
    # Each block's hidden-state input: its call's first argument.
    stream = [_internals.producing_call(block.output)[1][0] for block in blocks]
    stream.append(blocks[-1].output)
    probe = keras.Model(backbone.input, stream)
    recorded = {}

    def record(layer, key, reduce):
        call = layer.call

        def recording(inputs, *args, **kwargs):
            value = np.float64(_internals.to_numpy(inputs))
            recorded.setdefault(key, []).append(reduce(value))
            return call(inputs, *args, **kwargs)

        return layer, recording

    hooks = []
    for i, block in enumerate(blocks):
        down = _sublayer(block, family.down)
        hooks.append(record(down, ("units", i), _token_sum_abs))
        if family.heads_config:
            output = _sublayer(block, "attention_output")
            hooks.append(record(output, ("heads", i), _token_sum_norm))
    layers = np.zeros((len(blocks),))
    count = len(x["token_ids"])
    try:
        # The activations inside a block are not tensors of the
        # backbone's graph: each sublayer's `call` records its inputs
        # while the batch runs eagerly, and is restored after.
        for layer, recording in hooks:
            layer.call = recording
        for start in range(0, count, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in x.items()}
            mask = np.asarray(batch["padding_mask"], "float64")
            states = [np.float64(_internals.to_numpy(s)) for s in probe(batch)]
            for i in range(len(blocks)):
                layers[i] += _dissimilarity(states[i], states[i + 1], mask)
    finally:
        for layer, _ in hooks:
            if "call" in vars(layer):
                del layer.call
    scores = {"layers": layers / count}
    for key in ("units", "heads"):
        if (key, 0) in recorded:
            name = "intermediate" if key == "units" else "heads"
            scores[name] = np.stack(
                [_mean(recorded[(key, i)]) for i in range(len(blocks))]
            )
    return scores


def _mean(parts):
    return sum(total for total, _ in parts) / sum(count for _, count in parts)


def _token_sum_abs(value):
    flat = np.abs(value).reshape(-1, value.shape[-1])
    return flat.sum(axis=0), len(flat)


def _token_sum_norm(value):
    norms = np.sqrt(np.sum(value**2, axis=-1))
    flat = norms.reshape(-1, norms.shape[-1])
    return flat.sum(axis=0), len(flat)


def _dissimilarity(before, after, mask):
    """Σ over sequences of `1 −` the mean cosine similarity of the
    unpadded tokens' states before and after a block."""
    dot = np.sum(before * after, axis=-1)
    norms = np.linalg.norm(before, axis=-1) * np.linalg.norm(after, axis=-1)
    cosine = dot / np.maximum(norms, 1e-12)
    tokens = np.maximum(mask.sum(axis=-1), 1.0)
    return float(np.sum(1.0 - (cosine * mask).sum(axis=-1) / tokens))


def prune_backbone(
    backbone,
    num_layers=None,
    intermediate_dim=None,
    num_heads=None,
    scores=None,
):
    """A smaller KerasHub backbone of the same class, with copied weights.

    Minitron's axes: depth (whole transformer layers, the highest-scoring
    kept in their order), MLP width (the same number of units in every
    layer, each layer keeping its own highest-scoring ones) and attention
    heads (query heads; key and value heads go with them where there are
    as many, and with grouped-query attention every key/value group keeps
    the same number of query heads). The result is built from the
    backbone's own config with the new sizes, so that `get_config`,
    `from_config`, saving and the task classes (`GemmaCausalLM(backbone=
    ...)`) work as for any backbone; the embeddings and final
    normalisation are copied unchanged, the hidden size is kept. The
    result is trainable even where the original is frozen (as a teacher
    is), and the original is untouched.

    Supported: GPT-2 (`TransformerDecoder` blocks; depth and MLP width:
    its config derives the head size from `hidden_dim // num_heads`, so
    fewer heads of the same size cannot be expressed) and Gemma (all
    three; heads only with `query_head_dim_normalize=True`, whose softmax
    scale does not depend on the number of heads). Gemma's alternating
    sliding-window layers (Gemma 2) follow the new layer indices.

    Reference:

    - [Muralidharan et al., 2024](https://arxiv.org/abs/2407.14679)
      (Minitron)

    Args:
        backbone: A KerasHub backbone of a supported family.
        num_layers: Transformer layers to keep; needs `scores["layers"]`.
            Defaults to `None` (all).
        intermediate_dim: The new config's `intermediate_dim` (Gemma's
            MLP has half as many units). Defaults to `None` (unchanged).
        num_heads: Query heads to keep per layer. Defaults to `None`
            (unchanged).
        scores: As `keras_selfdistill.pruning.backbone_scores` returns
            them. Defaults to weight magnitudes (which cannot choose
            layers).

    Returns:
        The pruned backbone.

    Example:

    ```python
    ksd = keras_selfdistill
    scores = ksd.pruning.backbone_scores(teacher.backbone, batch)
    backbone = ksd.pruning.prune_backbone(
        teacher.backbone, num_layers=4, scores=scores)
    student = keras_hub.models.GemmaCausalLM(backbone=backbone)
    ```
    """
    family, blocks, config = _family(backbone)
    units, heads, kv_heads = _sizes(family, blocks[0])
    if scores is None:
        scores = _magnitudes(family, blocks)
    config = dict(config)
    kept_layers = _kept_layers(num_layers, blocks, scores)
    config["num_layers"] = len(kept_layers)
    unit_keep = head_keep = None
    if intermediate_dim is not None:
        new_units = _new_units(family, config, intermediate_dim, units)
        config["intermediate_dim"] = intermediate_dim
        unit_keep = [
            _top(_score(scores, "intermediate", i, units), new_units)
            for i in range(len(blocks))
        ]
    if num_heads is not None:
        _check_heads(family, config, backbone, num_heads, heads, kv_heads)
        config[family.heads_config] = num_heads
        if kv_heads == heads:
            config[family.kv_heads_config] = num_heads
        head_keep = [
            _grouped_top(_score(scores, "heads", i, heads), num_heads, kv_heads)
            for i in range(len(blocks))
        ]
    # A fresh model to train: the original may be frozen as a teacher.
    config["trainable"] = True
    pruned = type(backbone).from_config(config)
    block_names = {block.name for block in blocks}
    for layer in backbone.layers:
        if layer.name in block_names or not layer.weights:
            continue
        target = pruned.get_layer(layer.name)
        for old, new in zip(layer.weights, target.weights):
            new.assign(_internals.to_numpy(old))
    for new_block, index in zip(pruned.transformer_layers, kept_layers):
        old_block = blocks[index]
        slices = {}
        if unit_keep is not None:
            slices.update(
                {
                    p: (a, unit_keep[index])
                    for p, a in family.intermediate.items()
                }
            )
        if head_keep is not None:
            slices.update(
                {p: (a, head_keep[index]) for p, a in family.heads.items()}
            )
            if kv_heads == heads:
                slices.update(
                    {
                        p: (a, head_keep[index])
                        for p, a in family.kv_heads.items()
                    }
                )
        targets = {_relative(new_block, v): v for v in new_block.weights}
        for variable in old_block.weights:
            path = _relative(old_block, variable)
            value = _internals.to_numpy(variable)
            if path in slices:
                axis, kept = slices[path]
                value = np.take(value, kept, axis=axis)
            targets[path].assign(value)
    return pruned


def _kept_layers(num_layers, blocks, scores):
    if num_layers is None:
        return list(range(len(blocks)))
    check_positive_int("prune_backbone", "num_layers", num_layers)
    if num_layers > len(blocks):
        raise ValueError(
            f"`num_layers` keeps at most the backbone's {len(blocks)} layers."
            f" Received: num_layers={num_layers}"
        )
    if "layers" not in scores:
        raise ValueError(
            "Pruning depth needs `scores['layers']`, which weight "
            "magnitudes do not give: pass "
            "`scores=keras_selfdistill.pruning.backbone_scores(backbone, x)` "
            "with calibration inputs `x`, or your own. Received: scores "
            f"with keys {sorted(scores)}"
        )
    return list(_top(_score(scores, "layers", None, len(blocks)), num_layers))


def _score(scores, key, layer, size):
    if key not in scores:
        raise ValueError(
            f"`scores` has no {key!r}. Received: keys {sorted(scores)}"
        )
    value = np.asarray(scores[key], "float64")
    value = value if layer is None else value[layer]
    if value.shape != (size,):
        raise ValueError(
            f"`scores[{key!r}]` must have {size} scores per layer. "
            f"Received: shape {np.shape(scores[key])}"
        )
    return value


def _top(score, count):
    # A stable sort keeps the lower index among equal scores.
    return np.sort(np.argsort(-score, kind="stable")[:count])


def _grouped_top(score, count, groups):
    """The `count` highest-scoring query heads, as many from each of the
    `groups` key/value groups (query head `h` reads group `h // size`)."""
    if groups is None or groups == len(score):
        return _top(score, count)
    size = len(score) // groups
    kept = [
        g * size + _top(score[g * size : (g + 1) * size], count // groups)
        for g in range(groups)
    ]
    return np.concatenate(kept)


def _new_units(family, config, intermediate_dim, units):
    check_positive_int("prune_backbone", "intermediate_dim", intermediate_dim)
    new_units = intermediate_dim * family.units_per_config
    if new_units != int(new_units) or not 1 <= new_units <= units:
        raise ValueError(
            "`intermediate_dim` must give between 1 and the backbone's "
            f"{units} MLP units ({family.units_per_config:g} per unit of "
            f"`intermediate_dim`, {config['intermediate_dim']} now). "
            f"Received: intermediate_dim={intermediate_dim}"
        )
    return int(new_units)


def _check_heads(family, config, backbone, num_heads, heads, kv_heads):
    name = type(backbone).__name__
    if family.heads_config is None:
        raise ValueError(
            f"{name}'s config cannot express fewer attention heads of the "
            "same size (it derives the head size from the hidden size and "
            "the number of heads); prune its depth or MLP width. Received: "
            f"num_heads={num_heads}"
        )
    if not config.get("query_head_dim_normalize", True):
        raise ValueError(
            f"{name} with `query_head_dim_normalize=False` scales attention "
            "by the hidden size over the number of heads, so fewer heads "
            f"would change every head. Received: num_heads={num_heads}"
        )
    check_positive_int("prune_backbone", "num_heads", num_heads)
    grouped = kv_heads not in (None, heads)
    if num_heads > heads or (grouped and num_heads % kv_heads):
        raise ValueError(
            f"`num_heads` must be at most the backbone's {heads} query heads"
            + (
                f" and a multiple of its {kv_heads} key/value heads (each "
                "group keeps as many)"
                if grouped
                else ""
            )
            + f". Received: num_heads={num_heads}"
        )
