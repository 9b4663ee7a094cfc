"""Exact grading of simple answers (integers, decimals, scientific notation, fractions) with no
time limit and no math-verify call, so a trivial answer can never time out under load.

The rules reproduce math-verify's numeric comparison where it decides (math_verify.grader,
``sympy_numeric_eq``): rationals compare exactly; when either side is written with a decimal
point or an exponent (a sympy Float there), both are compared rounded to ``FLOAT_ROUNDING``
places. A pair this module cannot decide for certain (a near tie of that rounding) goes to
math-verify as before. Scientific notation (``1e-3``) is read as a number here, where
math-verify reads ``e`` as Euler's number.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

FLOAT_ROUNDING = 6  # math-verify's default float_rounding
MAX_EXPONENT = 400  # 10**400 is cheap; a larger written exponent is left to math-verify
MAX_SIMPLE_CHARS = 100

_DECIMAL = re.compile(r"([+-]?)(\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d+))?")
_RATIO = re.compile(r"([+-]?)(\d+)/(\d+)")
# \frac{a}{b}, -\frac{a}{b}, \frac{-a}{b}, \frac12 (one digit each): after kdrl.rewards.extract._normalize
_FRAC = re.compile(r"([+-]?)\\frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))")


def simple_number(text: str) -> Optional[tuple[Fraction, bool]]:
    """``(value, written_as_float)`` for a normalised simple answer, else None."""
    if len(text) > MAX_SIMPLE_CHARS:
        return None
    match = _DECIMAL.fullmatch(text)
    if match:
        sign, digits, exponent = match.groups()
        if exponent is not None and abs(int(exponent)) > MAX_EXPONENT:
            return None
        value = Fraction(digits) * (Fraction(10) ** int(exponent or 0))
        return (-value if sign == "-" else value), ("." in digits or exponent is not None)
    match = _RATIO.fullmatch(text)
    if match:
        sign, numerator, denominator = match.groups()
        if int(denominator) == 0:
            return None
        value = Fraction(int(numerator), int(denominator))
        return (-value if sign == "-" else value), False
    match = _FRAC.fullmatch(text)
    if match:
        sign, numerator, denominator, digit_n, digit_d = match.groups()
        numerator, denominator = int(numerator or digit_n), int(denominator or digit_d)
        if denominator == 0:
            return None
        value = Fraction(numerator, denominator)
        return (-value if sign == "-" else value), False
    return None


def grade_simple(gold: str, pred: str) -> Optional[bool]:
    """True/False when both normalised answers are simple numbers and the grade is certain;
    None when math-verify must decide."""
    a, b = simple_number(gold), simple_number(pred)
    if a is None or b is None:
        return None
    (x, x_float), (y, y_float) = a, b
    if x == y:
        return True
    if not (x_float or y_float):
        return False  # distinct rationals are never equal
    step = Fraction(1, 10 ** FLOAT_ROUNDING)
    if abs(x - y) >= 2 * step:
        return False  # they differ in the rounded digits however the ties go
    return None  # within rounding distance: math-verify's own rounding decides
