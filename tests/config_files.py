"""Loading configs/*.py the way `--config` does (tests run from anywhere)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def load_config(path_or_name):
    """`get_config()` of configs/<name>.py (or a path)."""
    path = pathlib.Path(path_or_name)
    if not path.is_file():
        path = ROOT / "configs" / f"{path_or_name}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module.get_config()
