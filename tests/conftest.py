import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# hermetic: `gensample list` caches the registry under XDG_CACHE_HOME; never the user's cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gensample-test-cache-")
torch.set_num_threads(1)  # tiny ops: threads cost more than they give (and CI has 2 cores)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
