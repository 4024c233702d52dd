"""The ``sparq-cpp`` command line.

    sparq-cpp generate -m smollm2-135m -p "The capital of France is" -n 64
    sparq-cpp generate -m gemma3-270m --chat -p "Name three rivers in Europe."
    sparq-cpp generate -m smollm2-135m -f essay.txt --sparq-compression 1/8 -n 128
    sparq-cpp demo                                  (a long essay answered with dense and with SparQ)
    sparq-cpp essays -n 3 > essay.txt               (a long text to try: about 7k tokens)
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
import time

from sparq_cpp.runinfo import default_threads


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
        ("GPU backend built", ", ".join(n for n, _ in _lib.gpu_devices()) or "no (CPU only)"),
        ("default threads", f"{default_threads()} (llama.cpp's: physical cores)"),
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
        if v is None or (v is False and a != "realloc"):
            continue
        out[f"sparq_{a}"] = v
    return out


def _flash_attn(value: str, sparq: bool, cache_type_v: str):
    """llama.cpp's -fa on|off|auto as llama-cpp-python's flash_attn: auto is on (the CPU and the GPU
    backends have it, and SparQ and a quantized V need it)."""
    from sparq_cpp.kv_types import v_needs_flash_attn

    if value == "off":
        if sparq:
            raise ValueError("-fa off: SparQ needs flash attention (V stored row-major): -fa on or auto")
        if v_needs_flash_attn(cache_type_v):
            raise ValueError(f"-fa off: a {cache_type_v} V cache needs flash attention: -fa on or auto")
        return False
    return True


def _sparq_summary(llm, n_ctx_seen: int) -> str:
    """One line: what SparQ did in this generation, and why it did not run when it did not."""
    st = llm.sparq_stats()
    line = (f"SparQ: {st['n_tokens_sparq']} tokens decoded with SparQ, {st['n_tokens_dense']} dense, "
            f"{st['n_layers_sparq']}/{st['n_layers']} layers")
    if st["read_fraction"]:
        line += f", attention reads {st['read_fraction']:.3f} of dense"
    if st["n_tokens_sparq"] == 0 and st["n_tokens_dense"] > 0:
        from sparq_cpp.sparq import DEFAULT_MIN_CTX

        min_ctx = llm.sparq.min_ctx if llm.sparq.min_ctx is not None else DEFAULT_MIN_CTX
        line += (f" (not used: the sequence reached {n_ctx_seen} tokens, fewer than sparq_min_ctx {min_ctx}, "
                 "the length from which SparQ replaces dense attention; a longer prompt or --sparq-min-ctx)")
    return line


def _cmd_generate(args: argparse.Namespace) -> int:
    from sparq_cpp import Llama, model_path
    from sparq_cpp._lib import llama_cpp
    from sparq_cpp.kv_types import cache_type

    _positive("-n/--n-predict", args.n_predict, allow=(-1,))
    if args.ctx_size < 0:
        raise ValueError(f"-c/--ctx-size must be >= 0 (0: the model's), got {args.ctx_size}")
    _positive("-t/--threads", args.threads)
    sparq = _sparq_kwargs(args)
    path = model_path(args.model)
    fa = _flash_attn(args.flash_attn, bool(sparq.get("sparq_k") or sparq.get("sparq_compression")), args.cache_type_v)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            args.prompt = f.read()
    threads = args.threads or default_threads()
    llm = Llama(model_path=path, n_ctx=args.ctx_size, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=args.n_gpu_layers, seed=args.seed, verbose=args.verbose, rpc_servers=args.rpc,
                type_k=cache_type(args.cache_type_k), type_v=cache_type(args.cache_type_v), flash_attn=fa,
                **sparq)
    max_tokens = None if args.n_predict == -1 else args.n_predict
    sampling = dict(max_tokens=max_tokens, temperature=args.temp, top_k=args.top_k,
                    top_p=args.top_p, stream=True)
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    if args.chat:
        chunks = (chunk["choices"][0]["delta"].get("content") or "" for chunk in
                  llm.create_chat_completion(messages=[{"role": "user", "content": args.prompt}], **sampling))
    else:
        sys.stdout.write(args.prompt)
        chunks = (chunk["choices"][0]["text"] for chunk in llm.create_completion(args.prompt, **sampling))
    t0 = time.perf_counter()
    t_first = None
    for text in chunks:
        if t_first is None:
            t_first = time.perf_counter()  # the prompt is processed, the first token sampled
        sys.stdout.write(text)
        sys.stdout.flush()
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)  # token counts: prompt batches, one-token decodes

    def speed(n, seconds):
        return f"{n} tokens, {n / seconds:.1f} t/s" if n and seconds > 0 else f"{n} tokens"

    # as llama-cli's closing line: the prompt's time to the first token, then the decode speed
    print(f"[ Prompt: {speed(perf.n_p_eval, (t_first or t_end) - t0)} | "
          f"Generation: {speed(perf.n_eval, t_end - (t_first or t_end))} | {threads} threads ]", file=sys.stderr)
    if llm.sparq is not None:
        print(f"[ {_sparq_summary(llm, llm.n_tokens)} ]", file=sys.stderr)
    return 0


def _positive(flag: str, value, allow=()) -> None:
    """ValueError unless value is None, >= 1, or one of allow."""
    if value is not None and value not in allow and value < 1:
        extra = "" if not allow else f" (or {', '.join(map(str, allow))})"
        raise ValueError(f"{flag} must be >= 1{extra}, got {value}")


def _int_list(flag: str, text: str, lo: int = 0) -> list:
    """'512,1024' -> [512, 1024]; ValueError naming the flag for anything else."""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    bad = [x for x in out if x < lo]
    if bad:
        raise ValueError(f"{flag}: every value must be >= {lo}, got {bad[0]}")
    return out


def _default_out(kind: str, names) -> str:
    """Where results go without --save: sparq-cpp-results/ of the working directory, never the
    repository's own results/ (its record of measurements)."""
    return f"sparq-cpp-results/{kind}_{'_'.join(Path(m).stem for m in names)}"


def _cmd_bench(args: argparse.Namespace) -> int:
    from sparq_cpp import bench

    # everything is checked before the first model loads
    shape = args.shape is not None
    if shape:
        from sparq_cpp.shapes import FILL_CACHE_TYPES, WEIGHT_TYPES, parse_shape

        parse_shape(args.shape)
        if args.weights not in WEIGHT_TYPES:
            raise ValueError(f"--weights must be one of {', '.join(WEIGHT_TYPES)}, got {args.weights!r}")
        for flag, t in (("-ctk", args.cache_type_k), ("-ctv", args.cache_type_v)):
            if t not in FILL_CACHE_TYPES:
                raise ValueError(f"--shape fills the cache with random rows of {', '.join(FILL_CACHE_TYPES)}; "
                                 f"{flag} {t} is not one of them")
    n_gen = args.n_gen if args.n_gen is not None else (8 if shape else 32)
    reps = args.reps if args.reps is not None else (3 if shape else 5)
    _positive("-n/--n-gen", n_gen)
    _positive("-r/--repetitions", reps)
    _positive("-t/--threads", args.threads)
    if args.n_prompt < 0:
        raise ValueError(f"-p/--n-prompt must be >= 0, got {args.n_prompt}")
    if args.depths:
        depths = _int_list("-d/--depths", args.depths, lo=0)
    elif shape:
        depths = [8192, 32768]
    else:
        depths = [512, 1024, 2048, 4096, 8000] + ([16384, 32768] if args.model == "gemma3-270m" else [])
    settings = args.settings.split(",") if args.settings else (["1/8", "1/16"] if shape else ["1/4", "1/8", "1/16", "k=64"])
    for s in settings:
        bench.parse_setting(s)  # ValueError before any work
    threads = args.threads or default_threads()
    if shape:
        name = args.shape.split(",")[0]
        out = args.save or f"sparq-cpp-results/bench_shape_{'custom' if '=' in name else name}"
        bench.run(None, depths, settings, threads, n_gen, reps, out, plot=not args.no_plot,
                  cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v, n_gpu_layers=args.n_gpu_layers,
                  n_prompt=args.n_prompt, fmt=args.output, shape=args.shape, weights=args.weights)
        return 0
    out = args.save or _default_out("bench", [args.model])
    bench.check(args.model, depths, n_gen, args.n_prompt)  # the model file, and tokens enough for the depths
    bench.run(args.model, depths, settings, threads, n_gen, reps, out, plot=not args.no_plot,
              cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v, n_gpu_layers=args.n_gpu_layers,
              n_prompt=args.n_prompt, fmt=args.output)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from sparq_cpp import eval as ev
    from sparq_cpp.models import model_path

    models = args.model.split(",")

    def per_model(flag, text, default, gemma_extra=()):
        if text:
            values = _int_list(flag, text, lo=1)
            return {m: values for m in models}
        return {m: default + (list(gemma_extra) if m == "gemma3-270m" else []) for m in models}

    # everything is checked before the first model loads
    parts = args.parts.split(",")
    bad = set(parts) - {"tf", "needle", "repeat"}
    if bad:
        raise ValueError(f"unknown --parts {', '.join(sorted(bad))} (tf, needle, repeat)")
    _positive("-n/--n-tokens", args.n_tokens)
    _positive("-t/--threads", args.threads)
    spec = args.settings.split(",") if args.settings else ev.DEFAULT_SPEC
    ev.parse_spec(spec)
    contexts = per_model("-c/--contexts", args.contexts, [2048, 4096, 8192], [16384])
    needle_contexts = per_model("--needle-contexts", args.needle_contexts, [2048, 4096, 8192])
    for m in models:
        model_path(m)
    out = args.save or _default_out("eval", models)
    ev.run(models, contexts, needle_contexts, args.n_tokens, args.threads or default_threads(), out, parts=parts,
           cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v, spec=spec)
    return 0


def _cmd_essays(args: argparse.Namespace) -> int:
    from sparq_cpp.models import essays_text

    _positive("-n", args.n)
    sys.stdout.write(essays_text(args.n) + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparq_cpp import demo

    _positive("--prompt-tokens", args.prompt_tokens)
    _positive("-n/--n-predict", args.n_predict)
    _positive("-t/--threads", args.threads)
    return demo.run(args.model, args.prompt_tokens, args.n_predict, args.compression, args.threads or default_threads())


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
        elif a == "realloc":  # as llama-cli: --sparq-realloc / --no-sparq-realloc
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
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


def _cache_type_args(p: argparse.ArgumentParser, choices=None) -> None:
    from sparq_cpp.kv_types import CACHE_TYPES

    choices = choices or CACHE_TYPES
    p.add_argument("-ctk", "--cache-type-k", choices=choices, default="f16",
                   help="KV cache type for K (SparQ reads f16, f32 and q8_0; others decode densely)")
    p.add_argument("-ctv", "--cache-type-v", choices=choices, default="f16",
                   help="KV cache type for V (quantized: flash attention on, the only dense path then)")


def build_parser() -> argparse.ArgumentParser:
    from sparq_cpp.eval import DEFAULT_SPEC as DEFAULT_EVAL_SPEC
    from sparq_cpp.kv_types import SPARQ_CACHE_TYPES

    ap = argparse.ArgumentParser(prog="sparq-cpp", description="SparQ Attention for llama.cpp")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streamed), with llama-cli's flag names")
    g.add_argument("-m", "--model", default="smollm2-135m",
                   help="named model (smollm2-135m, gemma3-270m) or path to a .gguf file")
    g.add_argument("-p", "--prompt", default="The capital of France is")
    g.add_argument("-f", "--file", default=None, help="read the prompt from this file (as llama.cpp's -f)")
    g.add_argument("-n", "--predict", "--n-predict", dest="n_predict", type=int, default=64,
                   help="tokens to generate (-1: until the end of the text or the context)")
    g.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (n_ctx; 0: the model's)")
    g.add_argument("-t", "--threads", type=int, default=None, help="threads (default: llama.cpp's, the physical cores)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0)
    g.add_argument("--rpc", default=None, metavar="SERVERS",
                   help="comma-separated RPC servers host:port (llama.cpp's --rpc); layers go there with -ngl")
    g.add_argument("--chat", action="store_true", help="use the model's chat template")
    g.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("-s", "--seed", type=int, default=0xFFFFFFFF)
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    g.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), default="auto",
                   help="flash attention, as llama.cpp's -fa (default auto: on; SparQ needs it)")
    _cache_type_args(g)
    add_sparq_args(g)
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("demo", help="a long essay answered with dense attention and with SparQ: both answers, "
                                     "and the decode speed of each")
    d.add_argument("-m", "--model", default="smollm2-135m")
    d.add_argument("--prompt-tokens", type=int, default=7000, help="essay tokens in the prompt")
    d.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    d.add_argument("--compression", type=_compression, default=1 / 8, help="SparQ's read budget (1/8 or 0.125)")
    d.add_argument("-t", "--threads", type=int, default=None, help="threads (default: llama.cpp's, the physical cores)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="decode speed, dense (flash attention off and on) against SparQ")
    b.add_argument("-m", "--model", default="smollm2-135m")
    b.add_argument("--shape", default=None,
                   help="instead of a model file: a model shape with random weights built in memory, its cache filled "
                        "to each depth without a prefill (speed only): llama3-8b, llama3.2-1b, llama3.2-3b, mistral-7b, "
                        "qwen2.5-7b, qwen2.5-1.5b; with sizes changed (llama3-8b,layers=8) or all given "
                        "(arch=llama,layers=4,embd=1024,heads=16,kv_heads=4,head_dim=64,ff=2816,vocab=32000)")
    b.add_argument("--weights", default="q4_0",
                   help="with --shape: the weights' type, q4_0 (default), q4_k, q5_k, q8_0 or f16 (the output matrix "
                        "q6_k for the 4- and 5-bit types, as llama-quantize makes it)")
    b.add_argument("-d", "--depths", "--n-depth", default=None,
                   help="comma-separated cache depths, as llama-bench's -d (default 512,1024,2048,4096,8000; "
                        "+16384,32768 on gemma3-270m; 8192,32768 with --shape)")
    b.add_argument("-s", "--settings", default=None,
                   help="comma-separated SparQ settings: compressions (1/8 or 0.125) and fixed k (k=64); "
                        "a suffix :ops runs the portable graph of standard ggml ops instead of the fused op (1/8:ops), "
                        ":float the float K^T mirror (1/8:float) (default 1/4,1/8,1/16,k=64; 1/8,1/16 with --shape)")
    b.add_argument("-t", "--threads", type=int, default=None, help="threads (default: llama.cpp's, the physical cores)")
    b.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all), as llama-bench's -ngl")
    b.add_argument("-n", "--n-gen", type=int, default=None,
                   help="tokens decoded per run, as llama-bench's -n (default 32; 8 with --shape)")
    b.add_argument("-p", "--n-prompt", type=int, default=0,
                   help="also time a prompt of this many tokens at each depth, as llama-bench's -p (default 0: none)")
    b.add_argument("-r", "--repetitions", dest="reps", type=int, default=None,
                   help="runs per setting and depth (median; default 5, 3 with --shape)")
    b.add_argument("-o", "--output", choices=("md", "csv", "json"), default="md",
                   help="format of the table printed to stdout, as llama-bench's -o (default md)")
    b.add_argument("--save", default=None, metavar="PREFIX",
                   help="write PREFIX.json and PREFIX.png (default sparq-cpp-results/bench_<model or shape>)")
    b.add_argument("--no-plot", action="store_true")
    _cache_type_args(b)
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser("eval", help="accuracy against dense: teacher forcing, needle, repetition, window baseline")
    e.add_argument("-m", "--model", default="smollm2-135m,gemma3-270m", help="comma-separated models")
    e.add_argument("-c", "--contexts", default=None,
                   help="teacher-forcing contexts (default 2048,4096,8192; +16384 on gemma3-270m)")
    e.add_argument("--needle-contexts", default=None,
                   help="needle and repetition contexts (default 2048,4096,8192)")
    e.add_argument("-s", "--settings", default=None,
                   help="comma-separated settings as bench's -s (1/8, k=64, 1/8:float, ...), plus 'ablations' (the 1/8 "
                        "ablations) and 'window' (the window baseline of each compression given); default "
                        f"{','.join(DEFAULT_EVAL_SPEC)}")
    e.add_argument("-n", "--n-tokens", type=int, default=256, help="teacher-forced tokens per context")
    e.add_argument("-t", "--threads", type=int, default=None, help="threads (default: llama.cpp's, the physical cores)")
    e.add_argument("--parts", default="tf,needle,repeat", help="which evaluations: tf,needle,repeat")
    e.add_argument("-o", "--save", default=None, metavar="PREFIX",
                   help="write PREFIX.json and PREFIX.png (default sparq-cpp-results/eval_<models>)")
    _cache_type_args(e, SPARQ_CACHE_TYPES)
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

    es = sub.add_parser("essays", help="print Paul Graham essays (the long text of the demo, bench and eval), "
                                       "e.g. sparq-cpp essays -n 3 > essay.txt")
    es.add_argument("-n", type=int, default=3, help="how many essays (default 3: about 7k tokens; 4: 13k)")
    es.set_defaults(func=_cmd_essays)

    i = sub.add_parser("info", help="versions, library path, CPU features, GPU backend")
    i.set_defaults(func=_cmd_info)
    return ap


def _one_line_warnings() -> None:
    """Warnings as one line each, as a command line program prints them (not Python's source line)."""
    import warnings

    warnings.showwarning = lambda message, category, *args, **kw: print(
        f"sparq-cpp: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _one_line_warnings()
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
