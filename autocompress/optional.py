"""Optional dependencies (pyproject's extras): what needs one says so in one line when it is
missing, with the extra to install, instead of an ImportError traceback.

    from .optional import require
    triton = require("triton", "gpu", "the triton backend")
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import AutocompressError

# module -> extra of pyproject.toml that installs it
EXTRAS = {"triton": "gpu", "onnxruntime": "runtime", "xllamacpp": "llamacpp"}


def available(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def require(module: str, extra: str | None = None, what: str | None = None) -> ModuleType:
    """``module``, imported; if it is not installed, an AutocompressError (exit 2) naming the
    extra that installs it: "<what> needs <module>: pip install 'autocompress[<extra>]'"."""
    extra = extra or EXTRAS.get(module.split(".")[0], "all")
    what = what or "this command"
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] == top:
            raise AutocompressError(
                f"{what} needs {top}: pip install 'autocompress[{extra}]'") from None
        # installed, but something it needs is not: say that rather than "install it"
        raise AutocompressError(f"{what} needs {top}, which is installed but does not import "
                                f"({exc})") from None
