"""Reports one skip in an environment without the vision extras (the other modules are not collected)."""

import pytest
from tests.vision.vision_helpers import VISION_MODULES

for _name in VISION_MODULES:
    pytest.importorskip(_name, reason=f"{_name} missing: run scripts/setup_vision_env.sh and use .venv-vision")


def test_vision_environment_imports():
    import torch
    import torchvision

    assert torch.__version__ and torchvision.__version__  # torchvision imports beside this torch
