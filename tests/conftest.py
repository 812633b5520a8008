"""Shared test helpers. Tests run on CPU in tiny configs; anything that needs ../shared skips when it is absent."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
CORTEX_TOKENS_DIR = SHARED_DIR / "cortex-2.5-tokens"

# One torch thread per test process: on a 2-core machine shared with other processes (subprocess ranks, a server
# thread), OpenMP threads spin against each other and a step can get tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cortex_tokens_dir() -> Path:
    """The original Cortex 2.5 tokenizer files (only present on development machines)."""
    if not (CORTEX_TOKENS_DIR / "tokenizer.model").exists():
        pytest.skip(f"{CORTEX_TOKENS_DIR} is absent (it holds the original Cortex 2.5 tokenizer for tests)")
    return CORTEX_TOKENS_DIR
