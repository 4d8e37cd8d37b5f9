"""Trait types of the admin's settings that traitlets lacks."""

from __future__ import annotations

import math
from typing import Any

from traitlets import Float


class FiniteFloat(Float):
    """A ``Float`` that refuses NaN and infinities: ``min=0`` lets ``float('nan')`` through (every
    comparison with NaN is false), and a NaN timeout or threshold turns its feature silently off."""

    info_text = "a finite number"

    def validate(self, obj: Any, value: Any) -> float:
        value = super().validate(obj, value)
        if not math.isfinite(value):
            self.error(obj, value)
        return value
