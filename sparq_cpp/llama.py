"""``sparq_cpp.Llama``: llama-cpp-python's ``Llama`` running on sparq-cpp's libllama."""

from __future__ import annotations

from ._lib import llama_cpp
from .models import KNOWN_MODELS, model_path as _model_path

__all__ = ["Llama"]


class Llama(llama_cpp.Llama):
    """Drop-in for ``llama_cpp.Llama``: same constructor, same methods.

    ``model_path`` may also be a named model (``"smollm2-135m"``, ``"gemma3-270m"``), fetched on
    first use.
    """

    def __init__(self, model_path: str, *args, **kwargs):
        if str(model_path) in KNOWN_MODELS:
            model_path = _model_path(model_path)
        super().__init__(model_path, *args, **kwargs)
