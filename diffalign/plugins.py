"""Plugins: packages that add rewards, captioners, prompt scorers and diffusion backbones by name, the way the toy
world does.

A plugin is a function ``register() -> None`` that calls the public registration functions
(:func:`diffalign.rewards.register_reward`, :func:`data_tools.caption.register_captioner`,
:func:`diffalign.eval.scoring.register_prompt_scorer`, :func:`diffalign.models.backbones.register_backbone`),
declared in the plugin package's ``pyproject.toml``::

    [project.entry-points."diffalign.plugins"]
    mine = "my_package.diffalign_plugin:register"

The registries call :func:`load_plugins` lazily, the first time a name is not found (or, for prompt scorers and
backbones, the first time they are listed, and for backbones before a pipeline's backbone is detected); every entry
point's ``register`` runs once per process. Registering in code (calling the registration functions directly) needs
no entry point. A plugin that fails to load is skipped with a warning naming it, so one broken package does not
take the others down.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

#: The entry-point group scanned by :func:`load_plugins`.
ENTRY_POINT_GROUP = "diffalign.plugins"

_loaded: list[str] | None = None


def load_plugins() -> list[str]:
    """Run ``register()`` of every ``diffalign.plugins`` entry point, once per process; the names that loaded."""
    global _loaded
    if _loaded is not None:
        return list(_loaded)
    _loaded = []  # set before calling: a plugin's registrations may look names up and must not re-enter
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()()
        except Exception as error:  # noqa: BLE001 - a broken plugin is reported, not fatal to the others
            warnings.warn(
                f"diffalign plugin {point.name!r} ({point.value}) failed to load and is skipped: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        _loaded.append(point.name)
    return list(_loaded)


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a usable registry name (a non-empty string without ``:``), else a ValueError naming it."""
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"{kind} name {name!r} must be a non-empty string without ':' (':' marks module:attribute)")
    return name
