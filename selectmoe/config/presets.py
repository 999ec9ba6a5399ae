"""The shipped YAMLs: each command's default config and the named selection presets.

Both are package data in ``selectmoe/configs/``. A preset (``preset=NAME``, pipeline / demo / sweep)
is a partial pipeline config; ``parse_config`` merges it under everything the user gives.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from selectmoe.config.loader import ConfigError, load_yaml


def shipped_yaml(name: str) -> Path:
    return Path(str(resources.files("selectmoe") / "configs" / name))


def preset_names() -> list[str]:
    return sorted(p.stem for p in shipped_yaml("presets").glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """``{"keys": nested pipeline keys, "requires": [dotted keys that must be set]}``."""
    if name not in preset_names():
        raise ConfigError(f"preset={name!r}: unknown preset; available: {preset_names()}")
    data = load_yaml(shipped_yaml("presets") / f"{name}.yaml")
    requires = data.pop("requires", [])
    return {"keys": data, "requires": requires}


def check_preset_inputs(cfg: Any) -> None:
    """Raise unless the keys the preset needs are set (checked when a run starts: the demo fills its
    own reference set in after parsing)."""
    name = cfg.preset
    for dotted in load_preset(name)["requires"]:
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if value in (None, "", []):
            raise ConfigError(
                f"preset={name} needs {dotted} (see selectmoe/configs/presets/{name}.yaml); "
                f"or choose another preset: {[p for p in preset_names() if p != name]}"
            )
