"""The ``sparq-cpp`` command line.

    sparq-cpp generate -m smollm2-135m -p "The capital of France is" -n 64
    sparq-cpp generate -m gemma3-270m --chat -p "Name three rivers in Europe."
    sparq-cpp generate -m smollm2-135m -f essay.txt --sparq-compression 1/8 -n 128
    sparq-cpp demo                                  (a long essay answered with dense and with SparQ)
    sparq-cpp eval -m smollm2-135m,gemma3-270m     (accuracy against dense)
    sparq-cpp serve --model smollm2-135m --sparq_compression 1/8   (python -m sparq_cpp.server)
    sparq-cpp info
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    import sparq_cpp
    from sparq_cpp import _lib

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    rows = [
        ("sparq-cpp", sparq_cpp.__version__),
        ("native library", _lib.sparq_version()),
        ("llama-cpp-python", ver("llama_cpp_python")),
        ("library path", str(_lib.LIB_PATH)),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("machine", f"{platform.machine()}, {os.cpu_count()} logical CPUs"),
        ("GPU backend built", "yes" if _lib.gpu_offload_supported() else "no (CPU only)"),
        ("devices", "; ".join(f"{n} ({d})" for n, d in _lib.backend_devices())),
        ("system info", _lib.system_info().strip()),
        ("model cache", str(sparq_cpp.models.cache_dir())),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def _sparq_kwargs(args: argparse.Namespace) -> dict:
    """The sparq_* arguments given on the command line (see add_sparq_args)."""
    from sparq_cpp.sparq import SPARQ_ARGS

    out = {}
    for a in SPARQ_ARGS:
        v = getattr(args, f"sparq_{a}")
        if v is None or v is False:
            continue
        out[f"sparq_{a}"] = {"on": True, "off": False}[v] if a == "realloc" else v
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    from sparq_cpp import Llama, model_path
    from sparq_cpp.kv_types import cache_type, v_needs_flash_attn

    path = model_path(args.model)
    extra = {"flash_attn": True} if args.flash_attn or v_needs_flash_attn(args.cache_type_v) else {}
    llm = Llama(model_path=path, n_ctx=args.ctx_size, n_threads=args.threads,
                n_gpu_layers=args.n_gpu_layers, seed=args.seed, verbose=args.verbose, rpc_servers=args.rpc,
                type_k=cache_type(args.cache_type_k), type_v=cache_type(args.cache_type_v), **extra,
                **_sparq_kwargs(args))
    sampling = dict(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                    top_p=args.top_p, stream=True)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            args.prompt = f.read()
    if args.chat:
        stream = llm.create_chat_completion(messages=[{"role": "user", "content": args.prompt}], **sampling)
        for chunk in stream:
            text = chunk["choices"][0]["delta"].get("content") or ""
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(args.prompt)
        for chunk in llm.create_completion(args.prompt, **sampling):
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
    sys.stdout.write("\n")
    if llm.sparq is not None:
        st = llm.sparq_stats()
        frac = f", attention reads {st['read_fraction']:.3f} of dense" if st["read_fraction"] else ""
        print(f"[SparQ: {st['n_tokens_sparq']} tokens decoded with SparQ, {st['n_tokens_dense']} dense, "
              f"{st['n_layers_sparq']}/{st['n_layers']} layers{frac}]", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sparq_cpp import bench

    depths = [int(x) for x in args.depths.split(",")] if args.depths else (
        [512, 1024, 2048, 4096, 8000] + ([16384, 32768] if args.model == "gemma3-270m" else []))
    settings = args.settings.split(",")
    for s in settings:
        bench.parse_setting(s)  # ValueError before any work
    out = args.output or f"results/bench_{Path(args.model).stem}"  # relative to the working directory
    bench.run(args.model, depths, settings, args.threads, args.n_gen, args.reps, out, plot=not args.no_plot,
              cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v, n_gpu_layers=args.n_gpu_layers)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from sparq_cpp import eval as ev

    models = args.model.split(",")

    def per_model(text, default, gemma_extra=()):
        if text:
            return {m: [int(x) for x in text.split(",")] for m in models}
        return {m: default + (list(gemma_extra) if m == "gemma3-270m" else []) for m in models}

    parts = args.parts.split(",")
    bad = set(parts) - {"tf", "needle", "repeat"}
    if bad:
        raise ValueError(f"unknown --parts {', '.join(sorted(bad))} (tf, needle, repeat)")
    out = args.output or f"results/eval_{'_'.join(Path(m).stem for m in models)}"
    ev.run(models, per_model(args.contexts, [2048, 4096, 8192], [16384]), per_model(args.needle_contexts, [2048, 4096, 8192]),
           args.n_tokens, args.threads, out, parts=parts, cache_type_k=args.cache_type_k,
           cache_type_v=args.cache_type_v)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparq_cpp import demo

    return demo.run(args.model, args.prompt_tokens, args.n_predict, args.compression, args.threads)


def _compression(text: str) -> float:
    from sparq_cpp.budget import parse_compression

    try:
        return parse_compression(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_sparq_args(p: argparse.ArgumentParser) -> None:
    """--sparq-<field> for each field of SparqParams, with its help text (the one list)."""
    from sparq_cpp.sparq import SPARQ_HELP, SPARQ_MIRRORS, SPARQ_PATHS

    g = p.add_argument_group("SparQ (none given: dense attention)")
    for a, help in SPARQ_HELP.items():
        flag = "--sparq-" + a.replace("_", "-")
        if a == "compression":
            g.add_argument(flag, type=_compression, default=None, help=help)
        elif a == "realloc":
            g.add_argument(flag, choices=["on", "off"], default=None, help=help)
        elif a == "layers":
            g.add_argument(flag, type=int, nargs=2, metavar=("START", "END"), default=None, help=help)
        elif a == "no_tau":
            g.add_argument(flag, action="store_true", help=help)
        elif a == "path":
            g.add_argument(flag, choices=SPARQ_PATHS, default=None, help=help)
        elif a == "mirror":
            g.add_argument(flag, choices=SPARQ_MIRRORS, default=None, help=help)
        else:
            g.add_argument(flag, type=int, default=None, help=help)


def _cache_type_args(p: argparse.ArgumentParser) -> None:
    from sparq_cpp.kv_types import CACHE_TYPES

    p.add_argument("-ctk", "--cache-type-k", choices=CACHE_TYPES, default="f16", help="KV cache type for K")
    p.add_argument("-ctv", "--cache-type-v", choices=CACHE_TYPES, default="f16",
                   help="KV cache type for V (quantized: flash attention on, the only dense path then)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparq-cpp", description="SparQ Attention for llama.cpp")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streamed)")
    g.add_argument("-m", "--model", default="smollm2-135m",
                   help="named model (smollm2-135m, gemma3-270m) or path to a .gguf file")
    g.add_argument("-p", "--prompt", default="The capital of France is")
    g.add_argument("-f", "--file", default=None, help="read the prompt from this file (as llama.cpp's -f)")
    g.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    g.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (n_ctx)")
    g.add_argument("-t", "--threads", type=int, default=None, help="threads (default: llama-cpp-python's)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    g.add_argument("--rpc", default=None, metavar="SERVERS",
                   help="comma-separated RPC servers host:port (llama.cpp's --rpc); layers go there with -ngl")
    g.add_argument("--chat", action="store_true", help="use the model's chat template")
    g.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("-s", "--seed", type=int, default=0xFFFFFFFF)
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    g.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention (on whenever SparQ is)")
    _cache_type_args(g)
    add_sparq_args(g)
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("demo", help="a long essay answered with dense attention and with SparQ: both answers, "
                                     "and the decode speed of each")
    d.add_argument("-m", "--model", default="smollm2-135m")
    d.add_argument("--prompt-tokens", type=int, default=7000, help="essay tokens in the prompt")
    d.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    d.add_argument("--compression", type=_compression, default=1 / 8, help="SparQ's read budget (1/8 or 0.125)")
    d.add_argument("-t", "--threads", type=int, default=2)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="decode speed, dense (flash attention off and on) against SparQ")
    b.add_argument("-m", "--model", default="smollm2-135m")
    b.add_argument("-d", "--depths", default=None,
                   help="comma-separated cache depths (default 512,1024,2048,4096,8000; +16384,32768 on gemma3-270m)")
    b.add_argument("-s", "--settings", default="1/4,1/8,1/16,k=64",
                   help="comma-separated SparQ settings: compressions (1/8 or 0.125) and fixed k (k=64); "
                        "a suffix :ops runs the portable graph of standard ggml ops instead of the fused op (1/8:ops)")
    b.add_argument("-t", "--threads", type=int, default=2)
    b.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all), as llama-bench's -ngl")
    b.add_argument("-n", "--n-gen", type=int, default=32, help="tokens decoded per run")
    b.add_argument("-r", "--reps", type=int, default=5, help="runs per setting and depth (median)")
    b.add_argument("-o", "--output", default=None, help="output prefix for .json and .png (default results/bench_<model>)")
    b.add_argument("--no-plot", action="store_true")
    _cache_type_args(b)
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser("eval", help="accuracy against dense: teacher forcing, needle, repetition, window baseline")
    e.add_argument("-m", "--model", default="smollm2-135m,gemma3-270m", help="comma-separated models")
    e.add_argument("-c", "--contexts", default=None,
                   help="teacher-forcing contexts (default 2048,4096,8192; +16384 on gemma3-270m)")
    e.add_argument("--needle-contexts", default=None,
                   help="needle and repetition contexts (default 2048,4096,8192)")
    e.add_argument("-n", "--n-tokens", type=int, default=256, help="teacher-forced tokens per context")
    e.add_argument("-t", "--threads", type=int, default=2)
    e.add_argument("--parts", default="tf,needle,repeat", help="which evaluations: tf,needle,repeat")
    e.add_argument("-o", "--output", default=None, help="output prefix for .json and .png (default results/eval_<models>)")
    _cache_type_args(e)
    e.set_defaults(func=_cmd_eval)

    # listed for --help only: main() hands everything after `serve` to the server's own parser
    sub.add_parser("serve", add_help=False, help="OpenAI-compatible server (llama-cpp-python's) with SparQ; "
                                                 "`sparq-cpp serve --help` lists its flags")

    # listed for --help only: main() hands everything after `rpc-server` to the server program
    sub.add_parser("rpc-server", add_help=False, help="llama.cpp's RPC server from the fork (ggml-rpc-server): "
                                                      "-H HOST -p PORT -t THREADS; `sparq-cpp rpc-server --help`")

    # listed for --help only: main() hands everything after the name to the program
    for name, what in (("llama-bench", "llama.cpp's benchmark table, with --sparq-compression 0,1/8 ... as columns"),
                       ("llama-cli", "llama.cpp's chat program, with --sparq-*"),
                       ("llama-server", "llama.cpp's HTTP server, with --sparq-*")):
        sub.add_parser(name, add_help=False, help=f"{what} (the fork's; `sparq-cpp {name} --help`)")

    i = sub.add_parser("info", help="versions, library path, CPU features, GPU backend")
    i.set_defaults(func=_cmd_info)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the server has its own (generated) flags
        from sparq_cpp import server

        return server.main(argv[1:])
    if argv[:1] == ["rpc-server"]:  # the fork's ggml-rpc-server, with its own flags
        from sparq_cpp import rpc

        try:
            return rpc.main(argv[1:])
        except FileNotFoundError as e:
            print(f"sparq-cpp: error: {e}", file=sys.stderr)
            return 2
    if argv[:1] and argv[0] in ("llama-bench", "llama-cli", "llama-server"):  # llama.cpp's programs
        from sparq_cpp import tools

        try:
            return tools.main(argv[0], argv[1:])
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"sparq-cpp: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"sparq-cpp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
