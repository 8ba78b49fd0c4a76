"""JSON that strict readers accept: results may hold NaN or infinities (a document with no byte to score),
which ``json.dumps`` writes as bare ``NaN`` / ``Infinity`` -- not JSON. They are written as ``null``."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(data: Any) -> Any:
    """``data`` with every non-finite float (in nested dicts, lists and tuples) replaced by ``None``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_null(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(v) for v in data]
    return data


def dumps(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``data`` with non-finite floats as ``null`` (and a guard that none is left)."""
    return json.dumps(finite_or_null(data), allow_nan=False, **kwargs)
