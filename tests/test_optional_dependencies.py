"""longseq must import and run on CPU without its optional dependencies (Triton, transformers, matplotlib):
`python3 dev.py quickstart` installs none of them. Each check runs in a fresh interpreter where importing
the dependency fails, as it does where it is not installed."""

from __future__ import annotations

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
import torch
import longseq
from longseq import build_model, generate, parse_policy

torch.manual_seed(0)
for kind, spec in [("transformer", "tova:8"), ("transformer", "h2o:8"), ("gla", None), ("megabyte", "tova:8")]:
    model = build_model(kind, "tiny").eval()
    prompt = b"To be, or not to be, that is the question"
    out = generate(model, prompt, 4, temperature=0, cache=parse_policy(spec) if spec else None)
    assert out.shape[-1] == len(prompt) + 4, out.shape
print("ok")
"""


@pytest.mark.parametrize("names", [["triton"], ["triton", "transformers", "matplotlib"]], ids=["no-triton", "none"])
def test_import_and_generate_without_optional_dependencies(names):
    code = BLOCK.format(names=names) + textwrap.dedent(RUN)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
