"""What counts as a number or an integer argument, decided once.

NumPy scalars (`np.float32(0.5)`, `np.int64(3)`) are numbers; booleans,
Python's or NumPy's, are not (`True` as a temperature is a mistake).
"""

import numbers

import numpy as np


def is_number(value):
    """Whether `value` is a real number, NumPy scalars included."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


def is_integer(value):
    """Whether `value` is an integer, NumPy integers included."""
    return isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )


def check_positive_int(owner, arg, value):
    if not is_integer(value):
        raise TypeError(
            f"{owner} `{arg}` must be a positive int. Received: {arg}={value!r}"
        )
    if value < 1:
        raise ValueError(
            f"{owner} `{arg}` must be a positive int. Received: {arg}={value}"
        )
