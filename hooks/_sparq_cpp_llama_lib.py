"""Makes ``import llama_cpp`` load sparq-cpp's libllama, so that llama-cpp-python code runs
unchanged on it (dense attention unless SparQ is asked for).

llama-cpp-python is installed without a library of its own and loads
``$LLAMA_CPP_LIB_PATH/libllama.so`` when ``llama_cpp`` is first imported. The ``.pth`` file
installed beside this module imports it at interpreter start; it adds a finder that, on the first
import of ``llama_cpp``, points that variable at ``sparq_cpp/lib`` (or ``$SPARQ_CPP_LIB_DIR``)
unless it is already set. Nothing else is imported at start.
"""

import os
import sys


def _lib_dir():
    env = os.environ.get("SPARQ_CPP_LIB_DIR")
    if env:
        return env
    from importlib.util import find_spec

    spec = find_spec("sparq_cpp")  # locates the package without importing it
    if spec is None or not spec.origin:
        return None
    # beside the package's __init__.py, where sparq_cpp itself looks (an editable install also
    # has a copy in site-packages: the package's own is the one)
    return os.path.join(os.path.dirname(spec.origin), "lib")


class _PointLlamaCppAtSparqCpp:
    def find_spec(self, name, path=None, target=None):
        if name == "llama_cpp":
            sys.meta_path.remove(self)  # once
            if "LLAMA_CPP_LIB_PATH" not in os.environ:
                d = _lib_dir()
                if d is not None and os.path.isdir(d):
                    os.environ["LLAMA_CPP_LIB_PATH"] = d
        return None  # the import itself goes on as usual


if not any(type(f).__name__ == _PointLlamaCppAtSparqCpp.__name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _PointLlamaCppAtSparqCpp())
