"""What a new user meets in the first hour, through the same doors: llama-cpp-python code run
unchanged on our library, the `sparq-cpp` command line as a real subprocess, and Python's
`Llama`. Bad input gets one clear line (or a ValueError) before any heavy work; SparQ that cannot
run says why, once."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import sparq_cpp
from sparq_cpp import Llama, SparqParams
from sparq_cpp.runinfo import default_threads

CLI = [sys.executable, "-m", "sparq_cpp.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _cli(args, cwd=None, timeout=300):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def _clean_env():
    # a user's shell: none of the variables the package sets for itself
    return {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "SPARQ_CPP_LIB_DIR")}


def test_llama_cpp_code_runs_unchanged_on_our_library(smollm2_path):
    # llama_cpp imported first, no variable set: it loads our library and decodes densely; SparQ
    # is then one set_sparq away on the same object
    code = f"""
from llama_cpp import Llama
import llama_cpp, sparq_cpp
from pathlib import Path
assert Path(llama_cpp.llama_cpp._lib._name).resolve() == sparq_cpp.LIB_PATH.resolve()
llm = Llama(model_path={str(smollm2_path)!r}, n_ctx=1024, flash_attn=True, verbose=False)
prompt = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"
print("DENSE", llm.create_completion(prompt, max_tokens=4, temperature=0)["choices"][0]["text"])
assert sparq_cpp.sparq_stats(llm)["n_layers_sparq"] == 0
sparq_cpp.set_sparq(llm, compression=1/8, min_ctx=0)
llm.create_completion(prompt, max_tokens=4, temperature=0)
st = sparq_cpp.sparq_stats(llm)
print("SPARQ", st["n_tokens_sparq"], st["n_layers_sparq"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DENSE  Paris" in r.stdout, r.stdout
    n_tok, n_layers = r.stdout.split("SPARQ")[1].split()
    assert int(n_tok) > 0 and int(n_layers) == 30


def test_cli_refuses_bad_values_in_one_line_before_loading(tmp_path):
    for args, message in [
        (["bench", "-n", "0"], "-n/--n-gen must be >= 1"),
        (["bench", "-r", "0"], "-r/--repetitions must be >= 1"),
        (["bench", "-s", "k=0"], "sparq_k must be"),
        (["bench", "-s", "1/0"], "not a fraction"),
        (["bench", "-d", "abc"], "-d/--depths takes comma-separated integers"),
        (["bench", "-d", "1000000"], "the essays give"),  # counted with the tokenizer alone, no context made
        (["bench", "-m", "llama-7b"], "unknown model 'llama-7b'"),
        (["eval", "-s", "1/8,bogus"], "not a fraction"),
        (["eval", "-c", "x"], "-c/--contexts takes comma-separated integers"),
        (["eval", "--parts", "tf,x"], "unknown --parts x"),
        (["demo", "-n", "0"], "-n/--n-predict must be >= 1"),
        (["generate", "-fa", "off", "--sparq-compression", "1/8"], "SparQ needs flash attention"),
        (["generate", "-n", "-5"], "-n/--n-predict must be >= 1 (or -1), got -5"),
    ]:
        r = _cli(args, cwd=tmp_path, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and message in r.stderr and len(lines) == 1, (args, r.stderr[-2000:])
    assert not (tmp_path / "sparq-cpp-results").exists()


def test_generate_takes_llama_cpp_flags_and_prints_speeds():
    # llama-cli's names: -fa on|off|auto, --predict, -ctk/-ctv with any of llama.cpp's cache
    # types (q4_0: SparQ cannot read it, so it says so once and decodes densely)
    r = _cli(["generate", "-p", "The capital of Germany is Berlin. The capital of France is", "--predict", "6",
              "-fa", "on", "-ctk", "q4_0", "-ctv", "q4_0", "--sparq-compression", "1/8", "--no-sparq-realloc"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout
    warn = [x for x in r.stderr.splitlines() if "warning" in x]
    assert len(warn) == 1 and "KV cache type" in warn[0] and "decoding stays dense" in warn[0], r.stderr
    speed = [x for x in r.stderr.splitlines() if x.startswith("[ Prompt:")]
    assert len(speed) == 1 and "t/s | Generation:" in speed[0] and f"| {default_threads()} threads ]" in speed[0], r.stderr


def test_generate_says_why_sparq_did_not_run():
    # a 12-token sequence never reaches min_ctx: the closing line says so, with the reason
    r = _cli(["generate", "-p", "The capital of France is", "-n", "8", "--sparq-compression", "1/8"])
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("[ SparQ:")]
    assert len(line) == 1 and "0 tokens decoded with SparQ" in line[0], r.stderr
    assert "fewer than sparq_min_ctx 512" in line[0]
    # a context shorter than min_ctx: one warning, nothing allocated
    r = _cli(["generate", "-c", "256", "-p", "The capital of France is", "-n", "4", "--sparq-compression", "1/8"])
    assert r.returncode == 0, r.stderr[-3000:]
    warn = [x for x in r.stderr.splitlines() if "warning" in x]
    assert len(warn) == 1 and "256 positions per sequence, fewer than min_ctx 512" in warn[0], r.stderr


def test_info_names_gpu_devices_only():
    r = _cli(["info"])
    assert r.returncode == 0
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("GPU backend built")]
    gpus = sparq_cpp._lib.gpu_devices()
    # RPC is built into every library: that alone is no GPU
    assert ("no (CPU only)" in line) == (not gpus), line
    assert f"default threads    {default_threads()}" in r.stdout


def test_gemma3_chat_answers():
    # the Gemma 3 GGUF has no chat template: Gemma's own turn format, not llama-2's fallback
    llm = Llama("gemma3-270m", n_ctx=512, verbose=False)
    try:
        assert llm.chat_format == "gemma"
    finally:
        llm.close()
    r = _cli(["generate", "-m", "gemma3-270m", "--chat", "-p", "Name three rivers.", "-n", "24"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), r.stdout


def test_bench_follows_llama_bench_and_writes_outside_the_repository(tmp_path):
    # --repetitions, -p (a prompt timed at the depth), -o json (the table's format, on stdout);
    # files go to sparq-cpp-results/ of the working directory, never to the checkout's results/
    before = sorted((ROOT / "results").iterdir())
    r = _cli(["bench", "-d", "600", "-n", "4", "-p", "32", "--repetitions", "1", "-s", "1/8", "-o", "json",
              "--no-plot"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert [row["setting"] for row in res["rows"]] == ["dense FA off", "dense FA on", "SparQ 1/8"]
    assert all(row["pp_tokens_per_s"] > 0 for row in res["rows"])
    assert res["threads"] == default_threads() and res["n_prompt"] == 32
    assert (tmp_path / "sparq-cpp-results" / "bench_smollm2-135m.json").exists()
    assert sorted((ROOT / "results").iterdir()) == before


def test_eval_runs_the_chosen_settings_on_every_model(tmp_path):
    # -s picks the settings; both models of a run get the same ones; --parts tf draws no empty panel
    r = _cli(["eval", "-m", "smollm2-135m,gemma3-270m", "-c", "640", "-n", "6", "-s", "1/8,window", "--parts", "tf"],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No artists" not in r.stderr and "Warning" not in r.stderr, r.stderr
    out = tmp_path / "sparq-cpp-results" / "eval_smollm2-135m_gemma3-270m"
    res = json.loads(out.with_suffix(".json").read_text())
    per_model = {m: [row["setting"] for row in res["tf"] if row["model"] == m] for m in ("smollm2-135m", "gemma3-270m")}
    assert per_model["smollm2-135m"] == per_model["gemma3-270m"] == ["1/8", "window 1/8 (k=80)"], per_model
    assert out.with_suffix(".png").stat().st_size > 5000


def test_named_model_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'llama-7b'.*smollm2-135m"):
        Llama("llama-7b")
    p = tmp_path / "notes.txt"
    p.write_text("not a model")
    with pytest.raises(ValueError, match="bad magic"):
        Llama(str(p))


def test_threads_default_to_llama_cpps():
    llm = Llama("smollm2-135m", n_ctx=256, verbose=False)
    try:
        assert llm.context_params.n_threads == llm.context_params.n_threads_batch == default_threads()
    finally:
        llm.close()


def test_context_shorter_than_min_ctx_warns_once_and_allocates_nothing():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        llm = Llama("smollm2-135m", n_ctx=256, sparq_compression=1 / 8, verbose=False)
    try:
        msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "fewer than min_ctx 512" in msgs[0], msgs
        assert llm.sparq is None and llm.sparq_stats()["extra_bytes"] == 0
        llm.set_sparq(compression=1 / 8, min_ctx=128)  # a min_ctx the context reaches: on
        assert llm.sparq == SparqParams(compression=1 / 8, min_ctx=128)
    finally:
        llm.close()


def test_set_sparq_says_that_it_replaces_the_settings():
    llm = Llama("smollm2-135m", n_ctx=1024, sparq_k=128, verbose=False)
    try:
        with pytest.raises(ValueError, match=r"replace all current ones, so give k or compression too \(now: k=128"):
            llm.set_sparq(l=200)
        llm.set_sparq(k=256, l=200)
        assert llm.sparq == SparqParams(k=256, l=200)
    finally:
        llm.close()
