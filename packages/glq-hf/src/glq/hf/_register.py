"""Registering ``quant_method: "glq"`` with transformers without importing it.

``import glq.hf`` must register "glq" (issue 6) yet stay cheap (the workspace rule: importing a
glq package pulls in no transformers). So: if ``transformers.quantizers`` is already imported,
register now; otherwise install a tiny import hook that registers the moment transformers
imports that package, which ``from_pretrained`` always does before it looks a quant_method up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

log = logging.getLogger("glq.hf")

_WATCHED = "transformers.quantizers"


def register_now() -> None:
    partial = sys.modules.get("glq.hf.quantizer")
    if partial is not None and not hasattr(partial, "register"):
        # glq.hf.quantizer is mid-import (its own `import transformers.quantizers` fired the hook):
        # it registers itself when it finishes, and importing it again here would fail.
        return
    from glq.hf.quantizer import register

    register()


class _AfterExec(importlib.abc.Loader):
    """Runs the real loader, then registers GLQ."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register_now()
        except (RuntimeError, ImportError) as err:  # never break the user's transformers import
            log.error("glq.hf could not register quant_method 'glq' with transformers: %s", err)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterExec(spec.loader)
        sys.meta_path.remove(self)  # one shot
        return spec


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they are."""
    if _WATCHED in sys.modules:
        register_now()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
