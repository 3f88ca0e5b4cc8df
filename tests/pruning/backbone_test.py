import keras
import numpy as np
import pytest
from absl.testing import absltest

import keras_selfdistill as ksd
from keras_selfdistill import _internals

keras_hub = pytest.importorskip("keras_hub")


def gemma(num_layers=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=30,
        num_layers=num_layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=8,
        intermediate_dim=12,
        head_dim=4,
    )


def gpt2(num_layers=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=30,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=12,
        max_sequence_length=8,
        dropout=0.0,
    )


def tokens(n=4, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 6), "int32")
    mask[0, 4:] = 0
    return {
        "token_ids": rng.integers(1, 30, (n, 6)).astype("int32"),
        "padding_mask": mask,
    }


def numpy(value):
    return np.float64(_internals.to_numpy(value))


def assign(block, path, function):
    variable = next(v for v in block.weights if v.path.endswith(path))
    value = _internals.to_numpy(variable).copy()
    function(value)
    variable.assign(value)


class PruneBackboneTest(absltest.TestCase):
    def test_nothing_removed_equals_the_original(self):
        backbone, x = gemma(), tokens()
        same = ksd.pruning.prune_backbone(
            backbone, intermediate_dim=12, num_heads=4
        )
        np.testing.assert_array_equal(numpy(same(x)), numpy(backbone(x)))
        self.assertIsInstance(same, keras_hub.models.GemmaBackbone)

    def test_removing_units_and_heads_removes_exactly_their_paths(self):
        # Layer i loses MLP unit i and, of each key/value group, the query
        # head with the lower score: zeroing their rows of the down and
        # output projections in the original gives the same outputs.
        backbone, x = gemma(), tokens()
        units = np.ones((3, 6))
        units[[0, 1, 2], [0, 1, 2]] = 0.0
        heads = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]], float)
        pruned = ksd.pruning.prune_backbone(
            backbone,
            intermediate_dim=10,
            num_heads=2,
            scores={"intermediate": units, "heads": heads},
        )
        for i, block in enumerate(backbone.transformer_layers):
            assign(
                block, "ffw_linear/kernel", lambda k, i=i: k.__setitem__(i, 0)
            )
            removed = np.flatnonzero(heads[i] == 0)
            assign(
                block,
                "attention_output/kernel",
                lambda k, r=removed: k.__setitem__(r, 0),
            )
        np.testing.assert_allclose(
            numpy(pruned(x)), numpy(backbone(x)), rtol=1e-5, atol=1e-5
        )
        config = pruned.get_config()
        self.assertEqual(
            (config["intermediate_dim"], config["num_query_heads"]), (10, 2)
        )
        self.assertEqual(config["num_key_value_heads"], 2)

    def test_dropping_a_layer_skips_exactly_that_layer(self):
        backbone, x = gpt2(), tokens()
        pruned = ksd.pruning.prune_backbone(
            backbone, num_layers=2, scores={"layers": [2.0, 0.0, 1.0]}
        )
        hidden = backbone.get_layer("token_embedding")(x["token_ids"])
        hidden = backbone.get_layer("embeddings_add")(
            (hidden, backbone.get_layer("position_embedding")(hidden))
        )
        for i in (0, 2):
            hidden = backbone.transformer_layers[i](
                hidden, decoder_padding_mask=x["padding_mask"]
            )
        expected = backbone.get_layer("layer_norm")(hidden)
        np.testing.assert_allclose(
            numpy(pruned(x)), numpy(expected), rtol=1e-5, atol=1e-5
        )
        self.assertEqual(pruned.num_layers, 2)
        restored = keras_hub.models.GPT2Backbone.from_config(
            pruned.get_config()
        )
        self.assertEqual(restored.count_params(), pruned.count_params())

    def test_a_frozen_teacher_prunes_into_a_trainable_backbone(self):
        backbone = gpt2()
        backbone.trainable = False
        pruned = ksd.pruning.prune_backbone(
            backbone, num_layers=2, scores={"layers": [2.0, 0.0, 1.0]}
        )
        self.assertEqual(len(pruned.trainable_weights), len(pruned.weights))
        self.assertFalse(backbone.trainable_weights)

    def test_scores_read_where_the_activations_are(self):
        # A unit whose gate is zero and a key/value group whose values are
        # zero carry nothing: their scores are zero, the others' are not.
        backbone, x = gemma(), tokens()
        block = backbone.transformer_layers[1]
        assign(
            block,
            "ffw_gating/kernel",
            lambda k: k.__setitem__((Ellipsis, 3), 0),
        )
        assign(block, "attention/value/kernel", lambda k: k.__setitem__(0, 0))
        scores = ksd.pruning.backbone_scores(backbone, x, batch_size=3)
        self.assertEqual(scores["intermediate"][1, 3], 0.0)
        self.assertTrue(np.all(np.delete(scores["intermediate"][1], 3) > 0))
        np.testing.assert_array_equal(scores["heads"][1, :2], 0.0)
        self.assertTrue(np.all(scores["heads"][1, 2:] > 0))
        self.assertEqual(scores["layers"].shape, (3,))

    def test_block_importance_is_one_minus_the_cosine(self):
        backbone, x = gpt2(), tokens()
        states = keras.Model(
            backbone.input,
            [backbone.get_layer("embeddings_dropout").output]
            + [block.output for block in backbone.transformer_layers],
        )(x)
        states = [numpy(s) for s in states]
        mask = x["padding_mask"].astype(float)
        expected = []
        for before, after in zip(states, states[1:]):
            cosine = np.sum(before * after, -1) / (
                np.linalg.norm(before, axis=-1) * np.linalg.norm(after, axis=-1)
            )
            per_sequence = (cosine * mask).sum(-1) / mask.sum(-1)
            expected.append(np.mean(1.0 - per_sequence))
        scores = ksd.pruning.backbone_scores(backbone, x, batch_size=3)
        np.testing.assert_allclose(scores["layers"], expected, rtol=1e-5)


class PruneBackboneBadInputTest(absltest.TestCase):
    def test_refusals(self):
        backbone = gpt2(num_layers=2)
        with self.assertRaisesRegex(
            ValueError, "GPT2Backbone's config cannot express"
        ):
            ksd.pruning.prune_backbone(backbone, num_heads=1)
        with self.assertRaisesRegex(ValueError, r"needs `scores\['layers'\]`"):
            ksd.pruning.prune_backbone(backbone, num_layers=1)
        with self.assertRaisesRegex(
            ValueError, "at most the backbone's 2 layers"
        ):
            ksd.pruning.prune_backbone(backbone, num_layers=3)
        with self.assertRaisesRegex(
            ValueError, "between 1 and the backbone's 12"
        ):
            ksd.pruning.prune_backbone(backbone, intermediate_dim=13)
        with self.assertRaisesRegex(
            TypeError, "KerasHub transformer backbones"
        ):
            ksd.pruning.prune_backbone(keras.Sequential([keras.Input((2,))]))
        backbone = gemma(num_layers=1)
        with self.assertRaisesRegex(
            ValueError, r"0.5 per unit.*intermediate_dim=7"
        ):
            ksd.pruning.prune_backbone(backbone, intermediate_dim=7)
        with self.assertRaisesRegex(ValueError, "multiple of its 2 key/value"):
            ksd.pruning.prune_backbone(backbone, num_heads=3)
        with self.assertRaisesRegex(ValueError, "4 scores per layer"):
            ksd.pruning.prune_backbone(
                backbone, num_heads=2, scores={"heads": np.ones((1, 3))}
            )
