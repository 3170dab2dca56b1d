"""Optional packages and user-named callables.

* :func:`require` / :func:`check_config_dependencies`: a feature whose package is not installed raises
  :class:`MissingDependencyError` naming the config key and the ``pip install`` line; the training CLIs check a
  config right after reading it, before any model loads (accelerate itself would skip a missing tracker silently).
* :func:`load_callable`: ``"package.module:function"`` or ``"file.py:function"`` from a config string; a bad spec
  raises :class:`CallableSpecError` naming the key.

Nothing here imports torch: the checks run before the heavy imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from diffalign.config import Config

__all__ = [
    "CallableFileNotFoundError",
    "CallableSpecError",
    "MissingDependencyError",
    "TRACKER_PACKAGES",
    "check_config_dependencies",
    "is_available",
    "load_callable",
    "require",
]

# accelerate tracker name -> the packages that provide it (any one is enough), as accelerate.utils.imports checks
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "mlflow": ("mlflow",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
}


class MissingDependencyError(DiffalignError, ImportError):
    """An optional package a config (or command) asks for is not installed; the message says what to install."""


class CallableSpecError(DiffalignError, ValueError):
    """A ``module:function`` config string that does not name a loadable callable."""


class CallableFileNotFoundError(CallableSpecError, FileNotFoundError):
    """The ``file.py`` of a ``file.py:function`` config string does not exist."""


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; not imported; ``sys.modules[name] = None`` counts as
    missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def require(modules: str | tuple[str, ...], feature: str, install: str) -> None:
    """Raise :class:`MissingDependencyError` unless one of ``modules`` is importable; ``feature`` names what needs
    it (e.g. ``"optim.optimizer=adamw_8bit"``), ``install`` the fix (e.g. ``"pip install 'diffalign[8bit]'"``)."""
    names = (modules,) if isinstance(modules, str) else modules
    if not any(is_available(name) for name in names):
        raise MissingDependencyError(f"{feature} needs {' or '.join(names)}, which is not installed: {install}")


def check_config_dependencies(config: Config) -> None:
    """The optional packages ``config`` needs: bitsandbytes for ``optim.optimizer=adamw_8bit``, each tracker of
    ``train.report_to`` (``all`` takes whatever is installed)."""
    if config.optim.optimizer == "adamw_8bit":
        install = "pip install 'diffalign[8bit]' (or pip install bitsandbytes)"
        require("bitsandbytes", "optim.optimizer=adamw_8bit", install)
    for tracker in config.train.report_to:
        if tracker in TRACKER_PACKAGES:
            packages = TRACKER_PACKAGES[tracker]
            install = f"pip install {packages[0]} (or drop '{tracker}' from train.report_to)"
            require(packages, f"train.report_to '{tracker}'", install)


def load_callable(spec: str, key: str = "online.reward_functions") -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` → the callable; errors name ``key``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CallableSpecError(f"{key}: '{spec}' must look like 'package.module:function' or 'file.py:fn'")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise CallableFileNotFoundError(f"{key}: '{spec}': {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"diffalign_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if not is_available(module_name):
            raise CallableSpecError(
                f"{key}: '{spec}': no module named '{module_name}' (give an importable module, or 'path/to/file.py:fn')"
            )
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CallableSpecError(f"{key}: '{spec}': {module_name} has no function '{attr}'")
    return fn
