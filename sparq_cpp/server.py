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
from .models import KNOWN_MODELS, head_size, model_path
from .runinfo import default_threads
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
            if not self.model_alias:
                self.model_alias = self.model  # requests and /v1/models use the short name
            self.model = str(model_path(self.model))  # fetched on first use
        if params is not None and os.path.isfile(self.model):
            check_against_model(params, self.model)  # what the GGUF's header already settles
        for name in ("n_threads", "n_threads_batch"):  # llama.cpp's default, as everywhere in sparq-cpp
            if name not in self.model_fields_set:
                setattr(self, name, default_threads())
        return self

    def sparq_params(self) -> Optional[SparqParams]:
        kwargs = {name: getattr(self, name) for name in type(self).model_fields if name.startswith("sparq_")}
        return SparqParams.from_kwargs(prefix="sparq_", **kwargs)  # validates sparq_layers' START END


class SparqSettings(ServerSettings, SparqModelSettings):
    """Server and model settings in one, as llama-cpp-python's ``Settings``."""


class SparqConfigFileSettings(ServerSettings):
    """``--config_file`` contents: server settings and a list of models with SparQ settings."""

    models: List[SparqModelSettings] = Field(default=[], description="Model configs")


def check_against_model(params: SparqParams, path: str) -> None:
    """The SparQ settings against the model's GGUF header, before the model loads: r within the
    head size, the layer range within the layers (ValueError otherwise)."""
    import gguf

    reader = gguf.GGUFReader(path, "r")

    def value(key):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    head = head_size(value)
    if params.r is not None and head and params.r > head:
        raise ValueError(f"sparq_r: {params.r} is larger than the model's head size {head}")
    n_layer = value(f"{value('general.architecture')}.block_count")
    if params.layers is not None and n_layer and (params.layers[0] >= n_layer or (params.layers[1] or 0) > n_layer):
        raise ValueError(f"sparq_layers: {list(params.layers)} is outside the model's {n_layer} layers")


def _with_sparq(llm, settings: ModelSettings):
    """Sets the model's SparQ settings on the context of a model upstream's loader made."""
    params = settings.sparq_params() if isinstance(settings, SparqModelSettings) else None
    if params is not None:
        _sparq.apply(llm._ctx.ctx, params, what=settings.model)
    return llm


def _error(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None) -> JSONResponse:
    """An error as OpenAI's API answers it."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}},
                        status_code=status)


class RequestValidation:
    """ASGI middleware of one app: a POST body that is not JSON, fails its route's request model
    (upstream's CreateCompletionRequest, ...) or OpenAI's rules that upstream does not check (a
    prompt or messages given, max_tokens >= 1, a model this server has) is answered with a 4xx
    and the reason, as OpenAI's API does (``invalid_request_error``), before the route runs;
    upstream's route handler would answer some with 500 and run others without a limit."""

    def __init__(self, app, routes, model_names=(), aliases=()):
        self.app = app
        self.routes = [r for r in routes if isinstance(r, APIRoute) and r.body_field is not None]
        self.model_names = set(model_names)  # what a request may name
        self.aliases = set(aliases)          # what /v1/models lists

    def check(self, route, body: bytes):
        """(status, message), message None when the body may go on to the route."""
        try:
            data = json.loads(body)
        except ValueError as e:
            return 400, f"invalid request: the body is not JSON ({e})"
        if not isinstance(data, dict):
            return 400, "invalid request: the body must be a JSON object"
        try:
            route.body_field.field_info.annotation.model_validate(data)
        except ValidationError as e:
            reasons = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
            return 400, f"invalid request: {reasons}"
        fields = route.body_field.field_info.annotation.model_fields
        if "prompt" in fields and not data.get("prompt"):
            return 400, "invalid request: prompt: a non-empty prompt is required"
        if "messages" in fields and not data.get("messages"):
            return 400, "invalid request: messages: a non-empty list of messages is required"
        mt = data.get("max_tokens")
        if "max_tokens" in fields and mt is not None and (not isinstance(mt, int) or mt < 1):
            return 400, f"invalid request: max_tokens: must be an integer >= 1 (or null: up to the context), got {mt!r}"
        model = data.get("model")
        if "model" in fields and model is not None and self.model_names and model not in self.model_names:
            return 404, (f"The model {model!r} does not exist on this server (GET /v1/models lists its models: "
                         f"{', '.join(sorted(self.aliases))})")
        return 400, None

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
        status, error = self.check(route, body)
        if error is not None:
            code = "model_not_found" if status == 404 else None
            return await _error(status, error, code)(scope, receive, send)
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
    # a request may name a model by its alias, its file or the file's name
    names = set()
    for m in model_settings:
        names |= {m.model_alias, m.model, os.path.basename(m.model), os.path.splitext(os.path.basename(m.model))[0]}
    app.add_middleware(RequestValidation, routes=_app.router.routes, model_names=names - {None, ""},
                       aliases={m.model_alias or m.model for m in model_settings})

    @app.get("/health", tags=["deployment"])
    def health():
        """Liveness, as llama.cpp's server answers it."""
        return {"status": "ok"}

    @app.get("/sparq/stats", tags=["SparQ"])
    def sparq_stats():
        """The loaded model's SparQ settings (null: dense) and counters since it loaded."""
        return stats_of(proxy)

    # at shutdown (SIGINT, SIGTERM): what SparQ did, in one line
    app.router.on_shutdown.append(lambda: print(_summary(stats_of(proxy)), file=sys.stderr, flush=True))
    return app


def stats_of(proxy) -> dict:
    """The proxy's loaded model: its alias, SparQ settings and counters (sparq_cpp.sparq.stats)."""
    llm = getattr(proxy, "_current_model", None)
    if llm is None:
        return {"model": None, "sparq": None, "stats": None}
    params = _sparq.current(llm._ctx.ctx)
    return {"model": proxy._current_model_alias,
            "sparq": None if params is None else {k: v for k, v in params.as_kwargs("").items() if v is not None},
            "stats": _sparq.stats(llm._ctx.ctx)}


def _summary(stats: dict) -> str:
    st = stats.get("stats")
    if not stats.get("sparq") or not st:
        return f"sparq-cpp serve: {stats.get('model')}: dense attention (SparQ off)"
    reads = f", attention reads {st['read_fraction']:.3f} of dense" if st["read_fraction"] else ""
    return (f"sparq-cpp serve: {stats['model']}: {st['n_tokens_sparq']} tokens decoded with SparQ, "
            f"{st['n_tokens_dense']} dense, {st['n_layers_sparq']}/{st['n_layers']} layers{reads}")


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
    except Exception as e:  # pydantic's ValidationError included: say what is wrong in one line, then usage
        print(f"{parser.prog}: error: {_one_line(e)} (--help lists the flags)", file=sys.stderr)
        return 2
    try:
        app = create_app(server_settings=server_settings, model_settings=model_settings)
    except (ValueError, FileNotFoundError) as e:  # SparqError (a setting the library refused) included
        print(f"{parser.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host),
                port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)
    return 0


def _one_line(e: Exception) -> str:
    """A settings error as one line: pydantic's field and message, without its dump and links."""
    if isinstance(e, ValidationError):
        out = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{where}: {msg}" if where and not msg.startswith(where) else msg)
        return "; ".join(out)
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
