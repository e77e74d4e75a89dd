"""vLLM's PD client script, as its Expert Parallel Deployment doc ships it, and the toy P/D proxy of
vLLM's NIXL integration tests: both are in vLLM's source distribution on PyPI
(docs/serving/expert_parallel_deployment.md, tests/v1/kv_connector/nixl_integration/
toy_proxy_server.py), not in its wheel, so .ci/run brings the sdist into .ci/vllm-sdist/ with pip
(nothing of it is committed) and tests read them out of the tarball as they are."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pytest

VERSION = "0.33.0"
SDIST = Path(__file__).resolve().parent.parent / ".ci" / "vllm-sdist" / f"vllm-{VERSION}.tar.gz"
DOC = "docs/serving/expert_parallel_deployment.md"
FETCH = ("VLLM_TARGET_DEVICE=empty VLLM_VERSION_OVERRIDE=0.33.0 python -m pip download -q --no-deps "
         "--no-binary :all: --no-build-isolation vllm==0.33.0 -d .ci/vllm-sdist")


TOY_PROXY = "tests/v1/kv_connector/nixl_integration/toy_proxy_server.py"


def read(path: str) -> str:
    """A file of vLLM's source tree, from the sdist."""
    if not SDIST.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SDIST} is missing: .ci/run fetches it ({FETCH})")
        pytest.skip(f"vLLM's sdist is not here; fetch it with: {FETCH}")
    with tarfile.open(SDIST) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/" + path))
        return tar.extractfile(member).read().decode()


def doc_client_script() -> str:
    """The Python block under the doc's "Client Orchestration Example" heading, unmodified."""
    section = read(DOC).split("### Client Orchestration Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)
