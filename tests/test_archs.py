"""SparQ on every architecture llama.cpp builds (tests/arch_check.py has the checks): on, and dense's
output to rounding where every position is read, or refused by name, never a crash or a wrong
answer. docs/architectures.md is the table these checks write."""

from pathlib import Path

import pytest

import arch_check

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architectures.md"


@pytest.fixture(scope="module")
def results():
    if not arch_check.GENERATOR.exists():
        pytest.fail(f"{arch_check.GENERATOR} is missing: `make build` builds it")
    paths = arch_check.generate()
    assert len(paths) > 100, "llama.cpp's generator wrote fewer models than it builds"
    return paths, arch_check.run_all(paths)


def test_every_model_runs_sparq_or_refuses_it_by_name(results):
    paths, res = results
    assert sorted(res) == sorted(p.name for p in paths)
    failed = {f: r.get("error") or r.get("refused") for f, r in res.items() if "error" in r or "refused" in r}
    assert not failed, failed
    for f, r in res.items():
        if r["status"] == "DENSE":
            # one warning, naming why; nothing decoded with SparQ
            assert len(r["warnings"]) == 1 and r["reason"] and r["reason"] in r["warnings"][0], (f, r)
            assert r["layers_sparq"] == 0, (f, r)
            continue
        assert r["status"] == "OK" and r["layers_sparq"] > 0, (f, r)
        # the layers of the cache SparQ does not take: named in one warning
        refused = r["layers_cache"] - r["layers_sparq"]
        assert len(r["warnings"]) == (1 if refused else 0), (f, r)
        want = {"exact", "ops", "budget", "state", "two_seqs", "seq_cp"} | ({"q8_0"} if "skipped" not in r else set())
        assert want <= set(r["checks"]), (f, r["checks"])
        bad = {name: c for name, c in r["checks"].items() if not c["ok"]}
        assert not bad, (f, bad)


def test_sparq_runs_on_the_common_families(results):
    _, res = results
    for f in ("llama-dense.gguf", "qwen2-dense.gguf", "qwen3-dense.gguf", "phi3-dense.gguf", "gemma3-dense.gguf",
              "mistral3-dense.gguf", "olmo2-dense.gguf", "granite-dense.gguf", "deepseek-moe.gguf", "qwen3moe-moe.gguf"):
        assert res[f]["status"] == "OK" and res[f]["layers_sparq"] > 0, (f, res[f])
        assert "shift" in res[f]["checks"], f


def test_the_docs_table_is_the_checks_output(results):
    _, res = results
    want = arch_check.table(res)
    assert DOC.read_text() == want, "docs/architectures.md differs from the checks: " \
                                    "python tests/arch_check.py --table docs/architectures.md"


def test_the_table_has_every_architecture_of_llama_cpp():
    names = arch_check.all_arch_names()
    assert len(names) > 140 and "llama" in names and "gpt-oss" in names
    text = DOC.read_text()
    missing = [n for n in names if f"| {n} |" not in text]
    assert not missing, missing


def test_a_layer_refused_beside_taken_ones_is_named_in_one_warning(results):
    # OpenELM with 65 query heads on the KV head of layer 1 (more than the op's group limit):
    # SparQ on layer 0, layer 1 dense, named with its reason once at the setting, none per token
    _, res = results
    r = res["openelm-g65-dense.gguf"]
    assert r["status"] == "OK" and r["layers_sparq"] == 1 and r["layers_cache"] == 2, r
    assert len(r["warnings"]) == 1 and "SparQ on 1 of 2 attention layers; dense: layer 1: more than 64 query heads" \
        in r["warnings"][0], r["warnings"]
    assert r["checks"]["exact"]["ok"], r["checks"]  # layer 0's SparQ beside layer 1's dense equals dense
