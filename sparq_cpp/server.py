"""llama-cpp-python's OpenAI-compatible server running ``sparq_cpp.Llama``.

    python -m sparq_cpp.server --model smollm2-135m --n_ctx 8192 --sparq_compression 1/8
    sparq-cpp serve --model path/to/model.gguf --sparq_k 64 --port 8000

Every flag of ``python -m llama_cpp.server`` works the same (its CLI is generated from its
pydantic settings); ``SparqModelSettings`` adds ``--sparq_<field>`` for each field of
``SparqParams`` (``--sparq_compression 1/8``, ``--sparq_layers START END``, ...), also in
``--config_file`` model entries. ``--model`` also takes a named model (``smollm2-135m``,
``gemma3-270m``), resolved to its file when the settings are validated. A SparQ setting turns
``flash_attn`` on unless it is given (``--flash_attn false`` with SparQ is refused).

How it hooks in, without replacing anything of llama-cpp-python's module-wide: upstream's
``create_app`` builds the app and its model proxy, which loads each model with upstream's loader
(a ``llama_cpp.Llama``); ``create_app`` here then sets SparQ on the loaded model's context, and
on each model the proxy loads later (an attribute of that proxy object alone); a middleware of
this app answers request bodies that fail validation with HTTP 400 and the reason, as OpenAI's
API does, where upstream's route handler answers 500.

The server needs llama-cpp-python's ``server`` extra: ``pip install 'sparq-cpp[server]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import List, Optional, Union, get_type_hints

try:
    import uvicorn
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from pydantic import Field, ValidationError, create_model, field_validator, model_validator
    from starlette.routing import Match
    import llama_cpp.server.app as _app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"the SparQ server needs llama-cpp-python's server extra ({e.name} is missing): "
                      "pip install 'sparq-cpp[server]'") from e

from . import sparq as _sparq
from .budget import parse_compression
from .models import KNOWN_MODELS, model_path
from .sparq import SPARQ_HELP, SparqParams, flash_attn_for

__all__ = ["SparqModelSettings", "SparqSettings", "RequestValidation", "create_app", "main"]

# SparqParams' fields as pydantic settings fields (the server's flags are generated from them),
# with their types, defaults and help; two take another form on a command line: the compression
# a string ("1/8") or a number, the layers a list (START END)
_CLI_TYPES = {"compression": Optional[Union[str, float]], "layers": Optional[List[int]]}
_HINTS = get_type_hints(SparqParams)
_SparqFields = create_model(
    "_SparqFields", __base__=ModelSettings,
    **{f"sparq_{f.name}": (_CLI_TYPES.get(f.name, _HINTS[f.name]), Field(default=f.default, description=f"SparQ: {SPARQ_HELP[f.name]}"))
       for f in fields(SparqParams)})


class SparqModelSettings(_SparqFields):
    """llama-cpp-python's ``ModelSettings`` plus the SparQ arguments of ``sparq_cpp.Llama``."""

    @field_validator("sparq_compression", mode="before")
    @classmethod
    def _compression(cls, v):
        return parse_compression(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_sparq(self):
        params = self.sparq_params()  # ValueError (a validation error) on bad settings
        given = self.flash_attn if "flash_attn" in self.model_fields_set else None
        if params is not None:
            self.flash_attn = flash_attn_for(params, given)
        if self.model in KNOWN_MODELS:
            self.model = str(model_path(self.model))  # fetched on first use
        return self

    def sparq_params(self) -> Optional[SparqParams]:
        kwargs = {name: getattr(self, name) for name in type(self).model_fields if name.startswith("sparq_")}
        return SparqParams.from_kwargs(prefix="sparq_", **kwargs)  # validates sparq_layers' START END


class SparqSettings(ServerSettings, SparqModelSettings):
    """Server and model settings in one, as llama-cpp-python's ``Settings``."""


class SparqConfigFileSettings(ServerSettings):
    """``--config_file`` contents: server settings and a list of models with SparQ settings."""

    models: List[SparqModelSettings] = Field(default=[], description="Model configs")


def _with_sparq(llm, settings: ModelSettings):
    """Sets the model's SparQ settings on the context of a model upstream's loader made."""
    params = settings.sparq_params() if isinstance(settings, SparqModelSettings) else None
    if params is not None:
        _sparq.apply(llm._ctx.ctx, params, what=settings.model)
    return llm


class RequestValidation:
    """ASGI middleware of one app: a POST body that fails its route's request model (upstream's
    CreateCompletionRequest, ...) is answered with HTTP 400 and the reason, as OpenAI's API does
    (``invalid_request_error``), before the route runs; upstream's route handler would answer
    it with 500. Bodies that are not JSON go on to the route, as before."""

    def __init__(self, app, routes):
        self.app = app
        self.routes = [r for r in routes if isinstance(r, APIRoute) and r.body_field is not None]

    async def __call__(self, scope, receive, send):
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        if route is None:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # not JSON: the route answers it
        if data is not None:
            try:
                route.body_field.field_info.annotation.model_validate(data)
            except ValidationError as e:
                reasons = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
                                    for err in e.errors())
                response = JSONResponse({"error": {"message": f"invalid request: {reasons}",
                                                   "type": "invalid_request_error", "param": None, "code": None}},
                                        status_code=400)
                return await response(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def create_app(server_settings: ServerSettings, model_settings: List[SparqModelSettings]):
    """llama-cpp-python's FastAPI app, its models with their SparQ settings."""
    if os.environ.get("CONFIG_FILE"):
        # upstream's create_app would read it again, with settings classes that refuse SparQ fields
        raise ValueError("CONFIG_FILE is set: read it with main() (or _load_config) and pass its settings")
    app = _app.create_app(server_settings=server_settings, model_settings=model_settings)
    proxy = _app._llama_proxy  # upstream's module state: the proxy its create_app just made
    _with_sparq(proxy(), model_settings[0])  # the default model (the first), loaded by the proxy
    upstream_load = proxy.load_llama_from_model_settings
    proxy.load_llama_from_model_settings = lambda settings: _with_sparq(upstream_load(settings), settings)
    app.add_middleware(RequestValidation, routes=_app.router.routes)
    return app


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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # as upstream's main: CONFIG_FILE first, then --config_file. This process reads it here,
        # with the SparQ fields, and drops it from its own environment, where upstream's
        # create_app would read it again without them (before any thread starts)
        config_file = os.environ.pop("CONFIG_FILE", None) or args.config_file
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
