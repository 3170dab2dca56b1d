"""Load a user-named callable from a config string."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_callable(spec: str, key: str = "online.reward_functions") -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` → the callable; errors name ``key``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}: '{spec}' must look like 'package.module:function' or 'file.py:fn'")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}: '{spec}': {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"diffalign_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}: '{spec}': {module_name} has no function '{attr}'")
    return fn
