"""Child Pythons of a test run get the hermetic check (tests/hermetic.py), then the sitecustomize shadowed."""

# The session puts this directory first on PYTHONPATH; Python imports the
# first sitecustomize it finds, so the one it would have imported (Debian's
# /usr/lib/python3.X/sitecustomize.py) is run from here. importlib.machinery
# only: importlib.util would cost milliseconds at every interpreter start.

import os
import sys
import types
from importlib.machinery import PathFinder, SourceFileLoader

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(name: str, loader, path: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__loader__, module.__file__ = loader, path
    loader.exec_module(module)
    return module


def _install_check() -> None:
    if "MDT_HERMETIC" not in os.environ:
        return
    try:
        # under a name of its own: tests/ stays off sys.path (its daemon.py,
        # helpers.py ... must not shadow anything of the child's)
        path = os.path.join(os.path.dirname(HERE), "hermetic.py")
        module = _run("_mdt_hermetic", SourceFileLoader("_mdt_hermetic", path), path)
        sys.modules["_mdt_hermetic"] = module
        module.install_from_env()
    except Exception:   # never change what the process does
        pass


def _chain() -> None:
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin:
        _run("sitecustomize", spec.loader, spec.origin)


_install_check()
_chain()
