"""longseq must import and run on CPU without its optional dependencies (Triton, transformers, matplotlib):
`python3 dev.py quickstart` installs none of them. Each check runs in a fresh interpreter where importing
the dependency fails, as it does where it is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

BLOCK = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as when it is not installed
"""

RUN = """
import json
import torch
import longseq
from longseq import build_model, generate, parse_policy

out = {}
for kind, spec in [("transformer", "tova:8"), ("transformer", "h2o:8"), ("gla", None), ("megabyte", "tova:8")]:
    torch.manual_seed(0)
    model = build_model(kind, "tiny").eval()
    prompt = b"To be, or not to be, that is the question"
    ids = generate(model, prompt, 6, temperature=0, cache=parse_policy(spec) if spec else None)
    out[f"{kind}-{spec}"] = ids.tolist()
print(json.dumps(out))
"""


def _generate_in_subprocess(blocked: list[str]) -> dict:
    code = BLOCK.format(names=blocked) + textwrap.dedent(RUN)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("names", [["triton"], ["triton", "transformers", "matplotlib"]], ids=["no-triton", "none"])
def test_import_and_generate_without_optional_dependencies(names):
    """Greedy continuations with the dependencies blocked equal those of the same code with nothing blocked."""
    with_everything = _generate_in_subprocess([])
    assert _generate_in_subprocess(names) == with_everything
    assert all(len(ids[0]) == 41 + 6 for ids in with_everything.values())
