"""The ``sparq-cpp`` command line.

    sparq-cpp generate -m smollm2-135m -p "The capital of France is" -n 64
    sparq-cpp generate -m gemma3-270m --chat -p "Name three rivers in Europe."
    sparq-cpp info
"""

from __future__ import annotations

import argparse
import os
import platform
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
        ("system info", _lib.system_info().strip()),
        ("model cache", str(sparq_cpp.models.cache_dir())),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from sparq_cpp import Llama, model_path

    path = model_path(args.model)
    llm = Llama(model_path=path, n_ctx=args.ctx_size, n_threads=args.threads,
                n_gpu_layers=args.n_gpu_layers, seed=args.seed, verbose=args.verbose)
    sampling = dict(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                    top_p=args.top_p, stream=True)
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparq-cpp", description="SparQ Attention for llama.cpp")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streamed)")
    g.add_argument("-m", "--model", default="smollm2-135m",
                   help="named model (smollm2-135m, gemma3-270m) or path to a .gguf file")
    g.add_argument("-p", "--prompt", default="The capital of France is")
    g.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    g.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (n_ctx)")
    g.add_argument("-t", "--threads", type=int, default=None, help="threads (default: llama-cpp-python's)")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="use the model's chat template")
    g.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("-s", "--seed", type=int, default=0xFFFFFFFF)
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("info", help="versions, library path, CPU features, GPU backend")
    i.set_defaults(func=_cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparq-cpp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
