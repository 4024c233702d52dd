"""Foundation: our library is the one loaded, real models generate sensible text, bad input is refused."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sparq_cpp
from sparq_cpp import Llama


def test_loaded_library_is_ours():
    import llama_cpp

    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    # the package's own lib folder, or the build that SPARQ_CPP_LIB_DIR names (make test-avx2)
    lib_dir = Path(os.environ.get("SPARQ_CPP_LIB_DIR") or Path(sparq_cpp.__file__).parent / "lib").resolve()
    assert loaded.parent == lib_dir, loaded
    assert loaded == sparq_cpp.LIB_PATH.resolve()
    assert sparq_cpp.sparq_version().startswith("sparq-cpp ")
    assert "0c1e570" in sparq_cpp.sparq_version()
    # the symbol answers through llama-cpp-python's own ctypes handle too: one library, not two
    assert hasattr(llama_cpp.llama_cpp._lib, "llama_sparq_version")


def test_llama_is_drop_in_subclass():
    import llama_cpp

    assert issubclass(Llama, llama_cpp.Llama)


def test_llama_cpp_imported_first_with_other_library_is_refused(tmp_path):
    # a copy of our library folder stands in for "another" libllama
    other = tmp_path / "otherlib"
    other.mkdir()
    for f in sparq_cpp.LIB_DIR.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    code = "import llama_cpp\nimport sparq_cpp\n"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(other))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "already imported with another library" in r.stderr
    assert str(other) in r.stderr


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_greedy_completion_and_chat(name):
    # gemma3-270m is the base (not instruction-tuned) model and its GGUF has no chat template:
    # one example turn in the prompt gets a sensible answer from both models.
    llm = Llama(model_path=sparq_cpp.model_path(name), n_ctx=512, verbose=False, seed=0)
    prompt = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"
    out = llm.create_completion(prompt, max_tokens=6, temperature=0.0)
    assert out["choices"][0]["text"].strip().startswith("Paris"), out
    messages = [
        {"role": "user", "content": "What is the capital of Germany?"},
        {"role": "assistant", "content": "The capital of Germany is Berlin."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    chat = llm.create_chat_completion(messages=messages, max_tokens=16, temperature=0.0)
    assert "Paris" in chat["choices"][0]["message"]["content"], chat


def test_named_model_accepted_by_llama():
    llm = Llama("smollm2-135m", n_ctx=256, verbose=False)
    assert llm.n_ctx() == 256


def test_unknown_model_name():
    with pytest.raises(ValueError) as e:
        sparq_cpp.model_path("llama-70b")
    assert "smollm2-135m" in str(e.value) and "gemma3-270m" in str(e.value)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        sparq_cpp.model_path(str(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ValueError, match="not a GGUF"):
        sparq_cpp.model_path(str(p))


def test_corrupt_gguf_file(tmp_path, smollm2_path):
    # a real header followed by garbage: the metadata reader must refuse it, and llama.cpp too
    p = tmp_path / "corrupt.gguf"
    data = Path(smollm2_path).read_bytes()[:4096]
    p.write_bytes(data[:64] + bytes(range(256)) * 16)
    with pytest.raises(ValueError, match="corrupt"):
        sparq_cpp.model_path(str(p))
    with pytest.raises(ValueError):
        Llama(model_path=str(p), verbose=False)


def test_cli_info_and_generate():
    exe = [sys.executable, "-m", "sparq_cpp.cli"]
    r = subprocess.run(exe + ["info"], capture_output=True, text=True, check=True)
    assert "sparq-cpp" in r.stdout and str(sparq_cpp.LIB_PATH) in r.stdout
    assert "GPU backend built" in r.stdout
    r = subprocess.run(exe + ["generate", "-m", "smollm2-135m", "-n", "8",
                              "-p", "The capital of Germany is Berlin. The capital of France is"],
                       capture_output=True, text=True, check=True)
    assert "Paris" in r.stdout
    r = subprocess.run(exe + ["generate", "-m", "no-such-model"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model" in r.stderr


def test_cli_demo_shows_dense_and_sparq_with_their_speeds():
    # make demo's command, shortened: both answers and both decode speeds, SparQ having run
    r = subprocess.run([sys.executable, "-m", "sparq_cpp.cli", "demo", "--prompt-tokens", "1500", "-n", "12"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "--- dense attention ---" in out and "--- SparQ, compression 1/8 ---" in out
    answers = re.findall(r"--- (?:dense attention|SparQ, compression 1/8) ---\n(.*)\n", out)
    assert len(answers) == 2 and all(len(re.findall(r"[A-Za-z]+", a)) >= 3 for a in answers), out  # words, not "."
    assert "over the same 12 tokens" in out
    dense = re.search(r"\| dense \(flash attention\) \| ([\d.]+) \|", out)
    sparq = re.search(r"\| SparQ 1/8 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out)
    assert dense and sparq, out
    assert float(dense.group(1)) > 0 and float(sparq.group(1)) > 0
    assert 0.05 < float(sparq.group(3)) < 0.2  # SparQ read about 1/8 of dense's bytes
    m = re.search(r"SparQ decoded (\d+) tokens on 30 of 30 attention layers", out)
    assert m and int(m.group(1)) > 1, out
