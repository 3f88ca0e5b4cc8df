import numpy as np
from absl.testing import parameterized

from keras_selfdistill import generations

# The toy data of Borup & Andersen's kernel-ridge example (their notebook
# `toy_example.ipynb`, itself from Mobahi et al. 2020): 11 noisy samples of
# sin(2πx) on [0, 1] and an RBF kernel exp(−8 (x − x')²).
_X = np.arange(0, 1.1, 0.1)
_Y = np.array(
    [
        0.38476636465198066,
        1.2333967683416893,
        1.33232242218057,
        0.69201594888895180,
        -0.29756145531871736,
        -0.24189291901377769,
        -0.7964485769175675,
        -0.9616480167034174,
        -0.49672509509916934,
        -0.3469066003991437,
        0.5589512650600734,
    ]
)
_KERNEL = np.exp(-8.0 * np.square(_X[:, None] - _X[None, :]))
_TRUTH = np.sin(2 * np.pi * _X)


class KernelRidgeGenerationsTest(parameterized.TestCase):
    @parameterized.named_parameters(("alpha_0_2", 0.2), ("alpha_0_6", 0.6))
    def test_infinite_steps_amplify_regularization(self, alpha):
        # Their theorem (and their notebook's f_∞): with ground-truth
        # weight α the iteration converges to ridge regression with λ / α,
        # f_∞ = α K (α K + λ I)⁻¹ y.
        regularization = 0.05
        fits = generations.kernel_ridge_generations(
            _KERNEL, _Y, regularization, [alpha] * 400
        )
        limit = (
            alpha
            * _KERNEL
            @ np.linalg.solve(alpha * _KERNEL + regularization * np.eye(11), _Y)
        )
        np.testing.assert_allclose(fits[-1], limit, rtol=1e-8, atol=1e-10)

    @parameterized.named_parameters(
        # The step losses Borup & Andersen print in their repository's README
        # (Kennethborup/self_distillation, "Illustrative example"): RBF
        # kernel exp(−80 (x − x')²), λ = 0.2, mean squared error against
        # sin(2πx) on x = 0, 0.01, ..., 1. Their step s is our fit s − 1.
        (
            "alpha_0",
            0.0,
            [0.16477, 0.15076, 0.14915, 0.15561, 0.16735, 0.18251],
            0.49505,
        ),
        (
            "alpha_0_35",
            0.35,
            [0.16477, 0.15424, 0.15089, 0.14983, 0.14954, 0.14948],
            0.14959,
        ),
    )
    def test_printed_step_losses(self, alpha, printed, printed_limit):
        def rbf(a, b):
            return np.exp(-80.0 * np.square(a[:, None] - b[None, :]))

        grid = np.arange(0, 1.01, 0.01)
        truth = np.sin(2 * np.pi * grid)
        fits = generations.kernel_ridge_generations(
            rbf(_X, _X), _Y, 0.2, [alpha] * 5, eval_kernel=rbf(grid, _X)
        )
        losses = [np.mean(np.square(fit - truth)) for fit in fits]
        np.testing.assert_allclose(losses, printed, atol=5e-6)
        # Their f_∞ for α = 0 is the zero function; for α > 0 it is ridge
        # regression with λ / α, reached here after many steps.
        limit = generations.kernel_ridge_generations(
            rbf(_X, _X), _Y, 0.2, [alpha] * 500, eval_kernel=rbf(grid, _X)
        )[-1]
        self.assertAlmostEqual(
            np.mean(np.square(limit - truth)), printed_limit, delta=5e-6
        )

    def test_without_labels_fits_shrink_to_zero(self):
        # α = 0 is Mobahi et al.'s self-distillation: f_k = A^k f_0 → 0.
        fits = generations.kernel_ridge_generations(
            _KERNEL, _Y, 0.05, [0.0] * 50
        )
        norms = [np.linalg.norm(f) for f in fits]
        self.assertTrue(all(a > b for a, b in zip(norms, norms[1:])))
        self.assertLess(norms[-1], 0.5 * norms[0])


class KernelLabelWeightTest(parameterized.TestCase):
    def test_closed_form_is_the_grid_minimum(self):
        regularization = 1e-3
        first = generations.kernel_ridge_generations(
            _KERNEL, _Y, regularization, []
        )[0]
        alpha = generations.kernel_label_weight(
            _KERNEL, _Y, first, _TRUTH, regularization
        )
        # f(α) is affine in α, so the squared error is a convex parabola:
        # the closed form must sit at the minimum of a fine, wide grid.
        grid = np.linspace(-50.0, 50.0, 100001)
        smoother = _KERNEL @ np.linalg.inv(
            _KERNEL + regularization * np.eye(11)
        )
        base, direction = smoother @ first, smoother @ (_Y - first)
        losses = np.sum(
            np.square(base + grid[:, None] * direction - _TRUTH), axis=1
        )
        self.assertLess(abs(alpha - grid[np.argmin(losses)]), 1e-3)
        best = generations.kernel_ridge_generations(
            _KERNEL, _Y, regularization, [alpha]
        )[-1]
        for other in (alpha - 0.05, alpha + 0.05, 1.0):
            worse = generations.kernel_ridge_generations(
                _KERNEL, _Y, regularization, [other]
            )[-1]
            self.assertLess(
                np.sum(np.square(best - _TRUTH)),
                np.sum(np.square(worse - _TRUTH)),
            )


class EstimateLabelWeightTest(parameterized.TestCase):
    def test_exact_for_affine_predictions(self):
        # In kernel ridge regression predictions are affine in α, so two
        # fits (α = 1 and α = 0) give the closed-form α* exactly.
        regularization = 1e-3
        first = generations.kernel_ridge_generations(
            _KERNEL, _Y, regularization, []
        )[0]
        labels_only = generations.kernel_ridge_generations(
            _KERNEL, _Y, regularization, [1.0]
        )[-1]
        teacher_only = generations.kernel_ridge_generations(
            _KERNEL, _Y, regularization, [0.0]
        )[-1]
        estimate = generations.estimate_label_weight(
            labels_only, teacher_only, _TRUTH
        )
        exact = generations.kernel_label_weight(
            _KERNEL, _Y, first, _TRUTH, regularization
        )
        self.assertAlmostEqual(estimate, exact, places=8)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "same shape"):
            generations.estimate_label_weight(
                np.zeros(2), np.zeros(3), np.zeros(2)
            )
        with self.assertRaisesRegex(ValueError, "coincide"):
            generations.estimate_label_weight(
                np.ones(2), np.ones(2), np.zeros(2)
            )
        with self.assertRaisesRegex(ValueError, "regularization=0"):
            generations.kernel_ridge_generations(_KERNEL, _Y, 0, [])
        with self.assertRaisesRegex(ValueError, "eval_kernel.shape"):
            generations.kernel_ridge_generations(
                _KERNEL, _Y, 0.1, [], eval_kernel=np.zeros((3, 4))
            )


class FitGenerationsTest(parameterized.TestCase):
    def test_generations_learn_from_their_predecessor(self):
        from tests import tiny

        x, y = tiny.data(n=40)
        seeds = iter(range(10))

        def build():
            return tiny.mlp(seed=next(seeds))

        results = generations.fit_generations(
            build,
            x,
            y,
            generations=2,
            xi=[0.5, 1.2],
            epochs=2,
            batch_size=10,
            verbose=0,
        )
        self.assertEqual([r["xi"] for r in results], [None, 0.5, 1.2])
        self.assertNotIn("distillation_loss", results[0]["history"].history)
        self.assertIn("distillation_loss", results[2]["history"].history)
        teacher = results[2]["student"]
        self.assertIsNot(teacher, results[1]["student"])

    def test_progress_bar_counts_trainings(self):
        import contextlib
        import io

        from tests import tiny

        x, y = tiny.data(n=20)
        seeds = iter(range(10))
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            generations.fit_generations(
                lambda: tiny.mlp(seed=next(seeds)),
                x,
                y,
                generations=2,
                epochs=1,
                batch_size=10,
                verbose=2,
            )
        text = output.getvalue()
        self.assertIn("3/3", text)
        self.assertRegex(text, r"generation: 2")

    def test_estimated_weight(self):
        from tests import tiny

        x, y = tiny.data(n=40)
        x_val, y_val = tiny.data(n=20, seed=1)
        seeds = iter(range(20))
        results = generations.fit_generations(
            lambda: tiny.mlp(seed=next(seeds)),
            x,
            y,
            generations=1,
            xi="estimate",
            validation_data=(x_val, y_val),
            epochs=2,
            batch_size=10,
            verbose=0,
        )
        self.assertTrue(np.isfinite(results[1]["xi"]))
        with self.assertRaisesRegex(ValueError, "validation_data"):
            generations.fit_generations(tiny.mlp, x, y, xi="estimate")
        with self.assertRaisesRegex(ValueError, "one `xi` per"):
            generations.fit_generations(tiny.mlp, x, y, xi=[0.1])
