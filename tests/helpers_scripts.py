"""Import a file of ``scripts/`` as a module, for the tests that call a script's functions directly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str, *, register: bool = False) -> ModuleType:
    """``scripts/<name>.py`` executed as a fresh module; with ``register`` it is also ``sys.modules[name]`` (what a
    script defining dataclasses or pickled objects needs), else it is named ``_script_<name>`` and not registered."""
    module_name = name if register else f"_script_{name}"
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
