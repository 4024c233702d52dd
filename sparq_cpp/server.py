"""llama-cpp-python's OpenAI-compatible server running ``sparq_cpp.Llama``.

    python -m sparq_cpp.server --model smollm2-135m --n_ctx 8192 --sparq_compression 1/8
    sparq-cpp serve --model path/to/model.gguf --sparq_k 64 --port 8000

Every flag of ``python -m llama_cpp.server`` works the same (its CLI is generated from its
pydantic settings); ``SparqModelSettings`` adds the SparQ ones (``--sparq_k``,
``--sparq_compression``, ``--sparq_r``, ``--sparq_l``, ``--sparq_realloc``, ``--sparq_min_ctx``,
``--sparq_layers START END``, ``--sparq_no_tau``), also in ``--config_file`` model entries.
``--model`` also takes a named model (``smollm2-135m``, ``gemma3-270m``). A SparQ setting turns
``flash_attn`` on unless it is given (``--flash_attn false`` with SparQ is refused).

The server needs llama-cpp-python's ``server`` extra: ``pip install 'sparq-cpp[server]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

try:
    import uvicorn
    from pydantic import Field, model_validator
    import llama_cpp.server.app as _app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"the SparQ server needs llama-cpp-python's server extra ({e.name} is missing): "
                      "pip install 'sparq-cpp[server]'") from e

import llama_cpp

from .llama import Llama
from .sparq import SparqParams, parse_fraction

__all__ = ["SparqModelSettings", "SparqSettings", "SparqLlamaProxy", "create_app", "main"]


class SparqModelSettings(ModelSettings):
    """llama-cpp-python's ``ModelSettings`` plus the SparQ arguments of ``sparq_cpp.Llama``."""

    sparq_k: Optional[int] = Field(default=None, description="SparQ: positions read exactly per generated token")
    sparq_compression: Optional[float] = Field(
        default=None, description="SparQ: target fraction of dense attention reads, e.g. 1/8 (instead of sparq_k)")
    sparq_r: Optional[int] = Field(default=None, description="SparQ: query components for the approximate scores")
    sparq_l: Optional[int] = Field(default=None, description="SparQ: local window (default k/4)")
    sparq_realloc: Optional[bool] = Field(default=None, description="SparQ: mean reallocation (default per model)")
    sparq_min_ctx: Optional[int] = Field(default=None, description="SparQ: cache length from which SparQ is used")
    sparq_layers: Optional[List[int]] = Field(default=None, description="SparQ: layers START END (END exclusive)")
    sparq_no_tau: bool = Field(default=False, description="SparQ ablation: scale by sqrt(d) instead of tau")

    @model_validator(mode="after")
    def _check_sparq(self):
        params = self.sparq_params()  # ValueError (a validation error) on bad settings
        if params is not None:
            if "flash_attn" not in self.model_fields_set:
                self.flash_attn = True
            elif not self.flash_attn:
                raise ValueError("SparQ needs flash_attn=True (V stored row-major); drop flash_attn=false")
        return self

    def sparq_params(self) -> Optional[SparqParams]:
        kwargs = {name: getattr(self, name) for name in type(self).model_fields if name.startswith("sparq_")}
        if kwargs["sparq_layers"] is not None:
            if len(kwargs["sparq_layers"]) != 2:
                raise ValueError(f"sparq_layers takes START END, got {kwargs['sparq_layers']}")
            kwargs["sparq_layers"] = tuple(kwargs["sparq_layers"])
        return SparqParams.from_kwargs(prefix="sparq_", **kwargs)


class SparqSettings(ServerSettings, SparqModelSettings):
    """Server and model settings in one, as llama-cpp-python's ``Settings``."""


class SparqConfigFileSettings(ServerSettings):
    """``--config_file`` contents: server settings and a list of models with SparQ settings."""

    models: List[SparqModelSettings] = Field(default=[], description="Model configs")


class SparqLlamaProxy(LlamaProxy):
    """The server's model holder, loading ``sparq_cpp.Llama`` with each model's SparQ settings."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        params = settings.sparq_params() if isinstance(settings, SparqModelSettings) else None
        kwargs = params.as_kwargs() if params is not None else {}
        # upstream's loader passes every ModelSettings field to `llama_cpp.Llama`, looked up when
        # it is called: point that name at our class, with these SparQ arguments, for the call
        # (a subclass, not a partial: request handlers also read `llama_cpp.Llama.__call__`)
        class _Llama(Llama):
            def __init__(self, *args, **kw):
                super().__init__(*args, **{**kwargs, **kw})

        upstream = llama_cpp.Llama
        llama_cpp.Llama = _Llama
        try:
            return LlamaProxy.load_llama_from_model_settings(settings)
        finally:
            llama_cpp.Llama = upstream


def create_app(server_settings: ServerSettings, model_settings: List[SparqModelSettings]):
    """llama-cpp-python's FastAPI app serving ``sparq_cpp.Llama`` models."""
    _app.LlamaProxy = SparqLlamaProxy  # the name create_app's set_llama_proxy builds the proxy with
    # upstream's create_app re-reads CONFIG_FILE with its own settings classes, which would drop
    # the SparQ fields: main() has read it already
    config_file = os.environ.pop("CONFIG_FILE", None)
    try:
        return _app.create_app(server_settings=server_settings, model_settings=model_settings)
    finally:
        if config_file is not None:
            os.environ["CONFIG_FILE"] = config_file


def _load_config(path: str) -> SparqConfigFileSettings:
    if not os.path.exists(path):
        raise ValueError(f"config file {path} not found")
    with open(path, "rb") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return SparqConfigFileSettings.model_validate_json(json.dumps(yaml.safe_load(f)))
        return SparqConfigFileSettings.model_validate_json(f.read())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparq_cpp.server",
        description="llama-cpp-python's OpenAI-compatible server with SparQ Attention")
    add_args_from_model(parser, SparqSettings)
    parser.add_argument("--config_file", type=str, help="Path to a config file to load.")

    def fraction(text: str) -> float:
        try:
            return parse_fraction(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    for action in parser._actions:  # accept 1/8 as well as 0.125
        if action.dest == "sparq_compression":
            action.type = fraction
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config_file = os.environ.get("CONFIG_FILE", args.config_file)
        if config_file:
            config = _load_config(config_file)
            server_settings = ServerSettings.model_validate(config)
            model_settings = list(config.models)
        else:
            server_settings = parse_model_from_args(ServerSettings, args)
            model_settings = [parse_model_from_args(SparqModelSettings, args)]
    except Exception as e:  # pydantic's ValidationError included: say what is wrong, then usage
        print(f"{parser.prog}: error: {e}\n(--help lists the flags)", file=sys.stderr)
        return 2
    app = create_app(server_settings=server_settings, model_settings=model_settings)
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host),
                port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
