"""The optional dependency of :mod:`longseq.hf`: import transformers with an actionable error."""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "longseq.hf needs transformers: pip install 'longseq[hf]'"


def require_transformers() -> ModuleType:
    """Import and return ``transformers``, or raise ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    return transformers
