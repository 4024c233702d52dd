"""llama.cpp's own programs from the fork (sparq_cpp/bin, `make tools`): llama-bench, llama-cli and
llama-server take --sparq-* flags (and LLAMA_ARG_SPARQ_* variables), apply them, and refuse bad
values the way llama.cpp refuses its own: a message and exit code 1, never an abort. Each program
runs a few seconds on smollm2-135m."""

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from sparq_cpp import models
from sparq_cpp.rpc import free_port
from sparq_cpp.tools import tool_path

TIMEOUT = 180


@pytest.fixture(scope="module")
def model():
    return str(models.model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def essay(tmp_path_factory):
    # ~1400 tokens: SparQ (min ctx 256) decodes every generated token
    p = tmp_path_factory.mktemp("tools") / "essay.txt"
    p.write_text(models.essays_text(8)[:6000] + "\n\nSummarize the essay above in one sentence.")
    return str(p)


def _run(tool, args, env=None):
    r = subprocess.run([str(tool_path(tool))] + args, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL, env=None if env is None else {**os.environ, **env})
    return r


def _sparq_tokens(log):
    m = re.search(r"llama_sparq: (\d+) tokens decoded with SparQ attention", log)
    return int(m.group(1)) if m else None


def test_llama_bench_dense_and_sparq_rows(model):
    # one run, dense and 1/8 at one depth: JSON rows on stdout, the markdown table on stderr (-oe)
    r = _run("llama-bench", ["-m", model, "-p", "0", "-n", "8", "-d", "512", "-r", "2", "-t", "2",
                             "--sparq-compression", "0,1/8", "--sparq-min-ctx", "256", "-o", "json", "-oe", "md"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    print(r.stderr[-1500:])
    assert [(x["sparq_compression"], x["n_depth"], x["n_gen"]) for x in rows] == [("0", 512, 8), ("1/8", 512, 8)]
    dense, sparq = rows
    assert dense["sparq_tokens"] == 0 and dense["sparq_min_ctx"] == -1
    assert sparq["sparq_tokens"] == 8 * 2 and sparq["sparq_min_ctx"] == 256  # every timed token, both runs
    assert all(x["avg_ts"] > 0 for x in rows)
    header = next(line for line in r.stderr.splitlines() if line.startswith("| model"))
    assert "sparq_compression" in header and "sparq_min_ctx" in header
    assert re.search(r"\| 1/8 +\| +256 \|", r.stderr), r.stderr[-1500:]


def test_llama_bench_k_rows_and_grid(model):
    # a k budget beside a compression, r as a dimension of the SparQ rows only
    r = _run("llama-bench", ["-m", model, "-p", "0", "-n", "4", "-d", "300", "-r", "1", "-t", "2", "-o", "csv",
                             "--sparq-compression", "0,1/8", "--sparq-k", "32", "--sparq-r", "4,8",
                             "--sparq-min-ctx", "256"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    got = [tuple(x[c] for c in ("sparq_compression", "sparq_k", "sparq_r", "sparq_tokens")) for x in rows]
    assert got == [("0", "0", "0", "0"), ("1/8", "0", "4", "4"), ("1/8", "0", "8", "4"),
                   ("-", "32", "4", "4"), ("-", "32", "8", "4")], got


def test_llama_bench_mirror_column(model):
    # --sparq-mirror as llama-cli's, with llama-bench's comma-separated values: a dimension of the SparQ rows
    r = _run("llama-bench", ["-m", model, "-p", "0", "-n", "4", "-d", "600", "-r", "1", "-t", "2", "-o", "csv",
                             "--sparq-compression", "0,1/8", "--sparq-mirror", "auto,float"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    got = [(x["sparq_compression"], x["sparq_mirror"], x["sparq_tokens"]) for x in rows]
    assert got == [("0", "auto", "0"), ("1/8", "auto", "4"), ("1/8", "float", "4")], got


@pytest.mark.parametrize("args, message", [
    (["--sparq-compression", "2"], "--sparq-compression: '2' is not a fraction in [0, 1]"),
    (["--sparq-compression", "1/x"], "--sparq-compression: '1/x' is not a fraction"),
    (["--sparq-k", "-3"], "--sparq-k: '-3' is not an integer"),
    (["--sparq-realloc", "2"], "--sparq-realloc: '2' is not an integer in [0, 1]"),
    (["--sparq-mirror", "int4"], "--sparq-mirror: 'int4' is not auto or float"),
    (["--sparq-k"], "--sparq-k needs a value"),
    (["--sparq-k", "32", "--sparq-r", "9999"], "SparQ settings refused: r must be in 1..head size"),
    (["--sparq-k", "32", "--sparq-l", "33"], "SparQ setting (k 32, r 0, l 33) refused: l must be in 0..k"),  # before loading
])
def test_llama_bench_bad_values(model, args, message):
    r = _run("llama-bench", ["-m", model, "-p", "0", "-n", "4", "-r", "1"] + args)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # an error, not a signal
    assert "error: " + message in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("how", ["flags", "env"])
def test_llama_cli_generates_with_sparq(model, essay, how):
    # the settings from flags or from LLAMA_ARG_SPARQ_* variables; -lv 4 shows libllama's report
    base = ["-m", model, "-f", essay, "-n", "16", "-c", "4096", "-t", "2", "--temp", "0", "-st", "-lv", "4"]
    if how == "flags":
        r = _run("llama-cli", base + ["--sparq-compression", "1/8", "--sparq-min-ctx", "256"])
    else:
        r = _run("llama-cli", base, env={"LLAMA_ARG_SPARQ_COMPRESSION": "1/8", "LLAMA_ARG_SPARQ_MIN_CTX": "256"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sparq-cpp: SparQ attention on (--sparq-compression 1/8 --sparq-min-ctx 256)" in r.stderr
    assert "llama_sparq_set: SparQ on 30 of 30 attention layers" in r.stderr
    n = _sparq_tokens(r.stderr)
    assert n is not None and n >= 8, r.stderr[-2000:]  # the generated tokens went through SparQ
    answer = r.stdout.split("Summarize the essay above in one sentence.")[-1]
    assert len(answer.strip()) > 20, r.stdout[-1000:]


@pytest.mark.parametrize("args, message", [
    (["--sparq-compression", "2"], 'error while handling argument "--sparq-compression": --sparq-compression: '
                                   "'2' is not a fraction in [0, 1]"),
    (["--sparq-k", "-1"], "--sparq-k must be >= 0, got -1"),
    (["--sparq-k", "32", "--sparq-r", "9999"], "error: SparQ settings refused: r must be in 1..head size"),
    (["--sparq-k", "32", "-fa", "off"], "(SparQ needs flash attention: -fa on or auto)"),
    (["--sparq-r", "8"], "error: --sparq-r/-l/-min-ctx/-realloc/-mirror need a budget"),
    (["--sparq-k", "32", "--sparq-mirror", "int4"], "--sparq-mirror: 'int4' is not auto or float"),
    (["--sparq-k", "32", "--sparq-compression", "1/8"], "error: SparQ settings refused: give k or compression, not both"),
    (["--sparq-k", "32", "--sparq-l", "33"], "error: SparQ settings refused: l must be in 0..k"),
])
def test_llama_cli_bad_values(model, args, message):
    r = _run("llama-cli", ["-m", model, "-p", "hi", "-n", "4", "-st"] + args)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert message in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


@contextlib.contextmanager
def _llama_server(model, log, args):
    """llama-server on a free port, ready (/health); stopped with SIGINT, which frees its context, so
    that libllama logs SparQ's counters (-lv 4). Yields a function that posts to /completion."""
    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(tool_path("llama-server")), "-m", model, "-t", "2", "--host", "127.0.0.1",
                                 "--port", str(port), "-lv", "4"] + args,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def complete(prompt, n_predict):
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.load(resp)

    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as h:
                    if h.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield complete
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_llama_server_answers_with_sparq(model, essay, tmp_path):
    log = tmp_path / "server.log"
    with _llama_server(model, log, ["-c", "4096", "-np", "1", "--sparq-compression", "1/8",
                                    "--sparq-min-ctx", "256"]) as complete:
        out = complete(open(essay).read(), 16)
        assert out["timings"]["predicted_n"] == 16 and out["content"].strip(), out
    text = log.read_text()
    assert "sparq-cpp: SparQ attention on (--sparq-compression 1/8 --sparq-min-ctx 256)" in text
    n = _sparq_tokens(text)
    assert n is not None and n >= 15, text[-2000:]  # the 16th token is sampled, not decoded


@pytest.mark.slow  # CI: make test-slow (make test: one request, and the Python server's concurrency test)
def test_llama_server_keeps_the_budget_with_two_requests_at_once(model, tmp_path):
    # two slots in one cache, two requests of different lengths decoded together: each sequence
    # reads 1/8 of its own dense bytes (the cache's length, set by both, does not count)
    log = tmp_path / "server2.log"
    text = models.essays_text(8)
    with _llama_server(model, log, ["-c", "8192", "-np", "2", "--sparq-compression", "1/8"]) as complete:
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda chars: complete(text[:chars], 24), [3000, 12000]))  # ~700 and ~2800 tokens
        assert all(o["timings"]["predicted_n"] == 24 for o in outs), outs
    log_text = log.read_text()
    m = re.search(r"SparQ layers read ([\d.]+) of dense", log_text)
    assert m and _sparq_tokens(log_text) >= 40, log_text[-2000:]
    print(f"two requests at once: read {m.group(1)} of dense")
    assert abs(float(m.group(1)) - 1 / 8) < 0.005


def test_llama_bench_says_which_rows_stay_dense(model):
    r = _run("llama-bench", ["-m", model, "-p", "0", "-n", "2", "-r", "1", "-t", "2", "-fa", "1",
                             "--sparq-compression", "0,1/8"])
    assert r.returncode == 0, r.stderr[-2000:]
    warn = [x for x in r.stderr.splitlines() if "SparQ rows of" in x]
    assert len(warn) == 1 and "tg2 @ d0" in warn[0] and "min_ctx (512)" in warn[0], r.stderr[-2000:]


def test_llama_server_bad_value_exits(model):
    r = _run("llama-server", ["-m", model, "--port", str(free_port()), "--sparq-compression", "1/0"])
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "--sparq-compression: '1/0' is not a fraction" in r.stdout + r.stderr


def test_sparq_cpp_runs_the_tools_with_named_models():
    from sparq_cpp.tools import resolve_models

    path = str(models.model_path("smollm2-135m"))
    assert resolve_models(["-m", "smollm2-135m", "-d", "8000"]) == ["-m", path, "-d", "8000"]
    assert resolve_models(["--model", "smollm2-135m,x.gguf"]) == ["--model", f"{path},x.gguf"]
    assert resolve_models(["-p", "smollm2-135m"]) == ["-p", "smollm2-135m"]
    with pytest.raises(ValueError, match="unknown tool"):
        tool_path("llama-quantize")
