"""The docs and the code say what is and why; their history lives in git. No reference to this
project's own commits or tracker issues outside docs/results.md (whose figures name the commit
that measured them) and the results files. Upstream's are named as such ("llama.cpp commit ...",
"llama.cpp issues ...")."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# an issue or issues with a number (a # before it or not), or the word commit and a hex hash of
# 7 to 40 digits; not after "llama.cpp "
HISTORY = re.compile(r"(?<!llama\.cpp )\b(issues? #?\d+|commit [0-9a-f]{7,40}\b)", re.IGNORECASE)
ALSO = re.compile(r"for lack of time|in an earlier session|this session", re.IGNORECASE)
SKIP = ("docs/results.md", "results/", "tests/test_docs.py")


def test_no_project_history_outside_results():
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    found = []
    for f in files:
        if f.startswith(SKIP) or not f.endswith((".md", ".py", ".cpp", ".h", ".txt", ".cmake", ".sh", "Makefile",
                                                  ".patch", "CMakeLists.txt", ".toml")):
            continue
        for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line) or ALSO.search(line):
                found.append(f"{f}:{n}: {line.strip()}")
    assert not found, "history belongs in git, not in the tree:\n" + "\n".join(found)
