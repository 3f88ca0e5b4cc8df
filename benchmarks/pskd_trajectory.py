"""How far `recipes.ps_kd` is from PS-KD's official code, weight by weight.

Softmax regression trained with SGD over 4 shuffled epochs (one `fit` per
epoch), against the float64 NumPy re-implementation of lgcnsai/PS-KD-
Pytorch's update in `tests/recipes_test.py`; and, for contrast, the recipe
this library documented before (`xi=LinearRampUp(ramp_up_epochs=T)`).

    python benchmarks/pskd_trajectory.py
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from tests import tiny  # noqa: E402
from tests.recipes_test import EPOCHS  # noqa: E402
from tests.recipes_test import _pskd_trajectory  # noqa: E402
from tests.recipes_test import fit_epochs  # noqa: E402


def main():
    x, y = tiny.data(n=24)
    rng = np.random.default_rng(3)
    permutations = [rng.permutation(24) for _ in range(EPOCHS)]
    for dtype in ("float32", "float16"):
        terms = {
            "recipes.ps_kd": ksd.recipes.ps_kd(24, 3, EPOCHS, dtype=dtype),
            "xi=LinearRampUp(ramp_up_epochs=T)": ksd.terms.Distillation(
                ksd.teachers.PastPredictions(24, 3, dtype=dtype),
                xi=ksd.schedules.LinearRampUp(ramp_up_epochs=EPOCHS, end=0.8),
            ),
        }
        for name, term in terms.items():
            (kernel, bias), weights = fit_epochs(term, x, y, permutations)
            expected = _pskd_trajectory(x, y, kernel, bias, permutations)
            gap = max(np.max(np.abs(w - e)) for w, e in zip(weights, expected))
            print(f"{dtype} bank, {name}: max |w - w_official| = {gap:.2e}")


if __name__ == "__main__":
    main()
