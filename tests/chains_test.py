import keras
import numpy as np
from absl.testing import absltest

import keras_selfdistill as ksd
from keras_selfdistill import _internals
from tests import tiny
from tests.diffusion.progressive_test import _Count

L = keras.layers


def original(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,))
    h = L.Dense(8, activation="relu", name="wide")(x)
    return keras.Model(x, L.Dense(3, name="logits")(h), name="original")


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, np.argmax(x[:, :3], axis=-1)


def weights(model):
    return [_internals.to_numpy(w) for w in model.weights]


def chain(directory=None, ratios=(0.5, 0.5), seed=0, callbacks=()):
    x, y = data()
    return ksd.chains.prune_and_distil(
        original(seed),
        list(ratios),
        x,
        y,
        calibration=x[:32],
        directory=directory,
        compile_kwargs={
            "optimizer": keras.optimizers.Adam(1e-2),
            "loss": tiny.sparse_ce(),
        },
        epochs=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


class PruneAndDistilTest(absltest.TestCase):
    def test_each_round_prunes_and_distils_the_one_before(self):
        rounds = chain()
        widths = [r["student"].get_layer("wide").units for r in rounds]
        self.assertEqual(widths, [4, 2])
        self.assertIs(rounds[1]["teacher"], rounds[0]["student"])
        for r in rounds:
            self.assertLen(r["history"]["distillation_loss"], 2)
            # Still trainable: the round after distilled from a copy.
            self.assertTrue(r["student"].trainable_weights)
        # Round 1 read round 0's student, and changed it not.
        first = ksd.pruning.prune(
            rounds[0]["teacher"],
            0.5,
            scores=ksd.pruning.activation(rounds[0]["teacher"], data()[0][:32]),
        )
        self.assertEqual(
            first.get_layer("wide").units,
            rounds[0]["student"].get_layer("wide").units,
        )

    def test_resumes_and_refuses_another_chain(self):
        folder = self.create_tempdir().full_path
        counter = _Count()
        first = chain(folder, callbacks=[counter])
        self.assertEqual(counter.fits, 2)
        again = _Count()
        loaded = chain(folder, callbacks=[again])
        self.assertEqual(again.fits, 0)
        for one, other in zip(first, loaded):
            for a, b in zip(weights(one["student"]), weights(other["student"])):
                np.testing.assert_array_equal(a, b)
            self.assertEqual(one["history"], other["history"])
        # One round more: the first two are loaded, the third trains.
        longer = _Count()
        chain(folder, ratios=(0.5, 0.5, 0.5), callbacks=[longer])
        self.assertEqual(longer.fits, 1)
        with self.assertRaisesRegex(
            ValueError, r"Round 0 .* \(teacher_weights differ\)"
        ):
            chain(folder, seed=1)
        with self.assertRaisesRegex(ValueError, r"Round 0 .* \(ratio differ\)"):
            chain(folder, ratios=(0.25, 0.5))

    def test_bad_arguments(self):
        x, y = data()
        with self.assertRaisesRegex(ValueError, "one pruning ratio per round"):
            ksd.chains.prune_and_distil(original(), [], x, y)
        with self.assertRaisesRegex(TypeError, "function from a round"):
            ksd.chains.prune_and_distil(original(), [0.5], x, y, terms=[])
        with self.assertRaisesRegex(ValueError, r"in \[0, 1\)"):
            ksd.chains.prune_and_distil(original(), [1.0], x, y, verbose=0)


if __name__ == "__main__":
    absltest.main()
