import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests build their own lab models in a temporary cache, never reading the user's."""
    os.environ["SDPO_CL_CACHE"] = str(tmp_path_factory.mktemp("sdpo_cl_cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
