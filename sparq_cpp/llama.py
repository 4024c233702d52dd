"""``sparq_cpp.Llama``: llama-cpp-python's ``Llama`` running on sparq-cpp's libllama."""

from __future__ import annotations

import os
from typing import Optional

from . import sparq as _sparq
from ._lib import SparqStatus, llama_cpp
from .models import KNOWN_MODELS, check_magic, model_path as _model_path
from .runinfo import default_threads
from .sparq import SparqError, SparqParams, flash_attn_for

__all__ = ["Llama", "SparqParams", "set_sparq", "sparq_stats"]


class Llama(llama_cpp.Llama):
    """Drop-in for ``llama_cpp.Llama``: same constructor, same methods, plus SparQ Attention.

    ``model_path`` may also be a named model (``"smollm2-135m"``, ``"gemma3-270m"``), fetched on
    first use.

    SparQ arguments (all keyword-only; none given: dense attention, exactly llama-cpp-python):
    ``sparq_<field>`` for each field of ``SparqParams`` (its docstring has the list), for example
    ``sparq_compression=1/8`` (a target fraction of dense attention's reads; k and r then follow
    the context length and head size) or ``sparq_k=64`` (positions read exactly per token).

    ``rpc_servers="host:port,..."`` puts layers (``n_gpu_layers``) on llama.cpp RPC servers
    (``sparq-cpp rpc-server``); an unreachable server raises ConnectionError (sparq_cpp.rpc), and
    so does ``eval`` (any generation) when a server goes away: ``sparq_cpp.rpc.RpcServerLost``,
    after which this model is unusable (its layers and cache were on that server): reload it.

    SparQ needs V stored row-major, which llama.cpp does with flash attention: a SparQ request
    turns ``flash_attn`` on (passing ``flash_attn=False`` with it is an error; ``flash_attn_for``).
    To switch SparQ on later with ``set_sparq``, create the model with ``flash_attn=True``.
    """

    def __init__(self, model_path: str, *args, **kwargs):
        sparq_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("sparq_")}
        params = SparqParams.from_kwargs(prefix="sparq_", **sparq_kwargs)  # ValueError before any loading
        if params is not None:
            kwargs["flash_attn"] = flash_attn_for(params, kwargs.get("flash_attn"))
        # llama-cpp-python 0.3.36 takes rpc_servers= and ignores it (llama.h lost the field); here it
        # registers the servers with ggml as llama.cpp's --rpc does, before the model loads
        rpc_servers = kwargs.pop("rpc_servers", None)
        self._rpc_endpoints = []
        if rpc_servers:
            from .rpc import add_servers

            self._rpc_endpoints = add_servers(rpc_servers)
        from .rpc import check_registered

        check_registered()
        # a named model is fetched; an unknown name, a missing file or a file that is not a GGUF
        # gets one clear message before llama.cpp tries to load it
        if str(model_path) in KNOWN_MODELS or not os.path.exists(model_path):
            model_path = _model_path(model_path)
        else:
            check_magic(model_path)
        # llama.cpp's default thread count (its physical cores) where llama-cpp-python's would
        # take half of the logical CPUs for decoding
        kwargs.setdefault("n_threads", default_threads())
        kwargs.setdefault("n_threads_batch", default_threads())
        self._sparq_params: Optional[SparqParams] = None
        super().__init__(model_path, *args, **kwargs)
        # a Gemma GGUF without a chat template would get llama-cpp-python's fallback (llama-2's
        # format), which Gemma answers with an empty turn: Gemma's own turn format instead
        if (kwargs.get("chat_format") is None and kwargs.get("chat_handler") is None
                and "tokenizer.chat_template" not in self.metadata
                and self.metadata.get("general.architecture", "").startswith("gemma")):
            self.chat_format = "gemma"
        if params is not None:
            self._set_sparq(params)

    def close(self) -> None:
        # a constructor refused before llama-cpp-python's __init__ ran leaves nothing to close
        if hasattr(self, "_stack"):
            super().close()

    def eval(self, tokens) -> None:
        try:
            super().eval(tokens)
        except RuntimeError as err:
            # the fork's ggml-rpc fails the decode when a server stops answering, where upstream's
            # aborts the process: a server that no longer accepts a connection is named, as a
            # ConnectionError (any other failure goes on as it came)
            if self._rpc_endpoints:
                from .rpc import lost_error

                lost = lost_error(self._rpc_endpoints)
                if lost is not None:
                    raise lost from err
            raise

    # -- SparQ ---------------------------------------------------------------------------------

    def _set_sparq(self, params: Optional[SparqParams]) -> None:
        rc = _apply(self, params)
        self._sparq_params = params if rc == SparqStatus.OK else None

    def set_sparq(self, params: Optional[SparqParams] = None, /, **kwargs) -> None:
        """Change SparQ settings on the live model (no reload), e.g. ``set_sparq(k=64)`` or
        ``set_sparq(compression=1/8, realloc=False)``; ``set_sparq(None)`` returns to dense.
        The new settings replace all the current ones (what is not given takes its default), so
        they always name k or compression. Tokens already in the cache are kept and taken into
        account."""
        self._set_sparq(_params_from(params, kwargs, self.sparq))

    def sparq_prepare_cache(self) -> bool:
        """Get this model's (empty) cache ready for SparQ without turning it on: with a quantized
        cache, llama.cpp's Hadamard rotation of Q and K is turned off, as a ``sparq_*`` argument
        to the constructor does, so that dense and SparQ decodes can share the cache (benchmarks,
        evaluations). False when the cache already holds rotated keys (the library logs why)."""
        return _sparq.prepare_cache(self._ctx.ctx) != SparqStatus.ROTATED

    @property
    def sparq(self) -> Optional[SparqParams]:
        """The current SparQ settings, or None when decoding is dense."""
        if self._ctx.ctx is None or not _sparq.is_set(self._ctx.ctx):  # the library is the truth
            return None
        return self._sparq_params  # as given (the C struct holds the compression as float32)

    def sparq_plan(self, params: Optional[SparqParams] = None, /, n_pos: Optional[int] = None, **kwargs) -> list:
        """What SparQ reads at each attention layer for a sequence of ``n_pos`` positions (default:
        the context's size), before any decode: with the current settings, or with the ones given
        (a SparqParams or keyword arguments, as set_sparq takes), without setting them. One dict
        per layer: ``path`` ("dense", "fused" or "ops"), ``r``, ``k``, ``l``, the K^T ``mirror``
        type, the estimated K/V ``bytes`` a token reads there and ``bytes_dense``, dense's."""
        p = _params_from(params, kwargs, self.sparq) if (params is not None or kwargs) else self.sparq
        if p is None:
            raise ValueError("sparq_plan: SparQ is off; give settings (sparq_plan(compression=1/8)) to see their plan")
        return _sparq.plan(self._ctx.ctx, p, self.n_ctx() if n_pos is None else n_pos)

    def sparq_stats(self, reset: bool = False) -> dict:
        """Counters: tokens decoded with SparQ and dense (while SparQ was set), layers using it,
        estimated attention bytes read against dense, extra memory."""
        return _sparq.stats(self._ctx.ctx, reset)

    def __getstate__(self):
        state = super().__getstate__()
        if self._sparq_params is not None:
            state.update(self._sparq_params.as_kwargs())
        return state


def _params_from(params, kwargs: dict, now: Optional[SparqParams]) -> Optional[SparqParams]:
    """set_sparq's arguments -> the settings (None: off); ValueError on a bad combination."""
    if params is not None and kwargs:
        raise ValueError("give a SparqParams or keyword arguments, not both")
    if params is None and kwargs:
        if "k" not in kwargs and "compression" not in kwargs:
            current = f" (now: {_sparq.describe(now)})" if now is not None else ""
            raise ValueError(f"set_sparq({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): the settings "
                             f"replace all current ones, so give k or compression too{current}; "
                             "set_sparq(None) turns SparQ off")
        return SparqParams.from_kwargs(**kwargs)
    if params is not None and not isinstance(params, SparqParams):
        raise ValueError(f"set_sparq takes a SparqParams, keyword arguments or None, got {params!r}")
    return params


def _apply(llm, params: Optional[SparqParams]) -> SparqStatus:
    try:
        return _sparq.apply(llm._ctx.ctx, params)
    except SparqError as e:
        if e.status == SparqStatus.ERR_V_TRANS:
            raise SparqError(e.status, "this model stores V transposed (flash_attn=False): create it with "
                             "flash_attn=True, or with a sparq_* argument, to use SparQ") from None
        raise


def set_sparq(llm: llama_cpp.Llama, params: Optional[SparqParams] = None, /, **kwargs) -> None:
    """SparQ on any ``llama_cpp.Llama`` on this library, such as one made by existing
    llama-cpp-python code: ``set_sparq(llm, compression=1/8)``; ``set_sparq(llm, None)`` turns it
    off. The model must have been created with ``flash_attn=True``. Same arguments as
    ``Llama.set_sparq``."""
    if isinstance(llm, Llama):
        return llm.set_sparq(params, **kwargs)
    now = _sparq.current(llm._ctx.ctx)
    _apply(llm, _params_from(params, kwargs, now))


def sparq_stats(llm: llama_cpp.Llama, reset: bool = False) -> dict:
    """``Llama.sparq_stats`` for any ``llama_cpp.Llama`` on this library."""
    return _sparq.stats(llm._ctx.ctx, reset)
