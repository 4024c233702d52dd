"""sparq-cpp: SparQ Attention for llama.cpp, with llama-cpp-python's API.

Import this package before ``llama_cpp``: it makes llama-cpp-python load sparq-cpp's own
libllama (a fork of the pinned llama.cpp).
"""

from ._lib import LIB_DIR, LIB_PATH, SparqStatus, llama_cpp, sparq_version
from .llama import Llama, set_sparq, sparq_stats
from .sparq import SparqError, SparqParams
from .models import KNOWN_MODELS, model_path

__version__ = "0.1.0"

__all__ = ["Llama", "set_sparq", "sparq_stats", "SparqParams", "SparqError", "SparqStatus", "model_path", "KNOWN_MODELS", "sparq_version", "LIB_DIR", "LIB_PATH", "llama_cpp", "__version__"]
