"""Deprecations caused by our own calls fail the tests a release before the API goes away.

`pyproject.toml`'s `filterwarnings` turns `DeprecationWarning` / `FutureWarning` into errors when the warning is
attributed to our code: the package, the remote code of a saved folder, the tests. A warning is attributed to the
frame its `stacklevel` names, and libraries are not consistent about it, so `attribute_to_callers` makes
`warnings.warn` attribute every deprecation to the caller of the function that raised it:

- `stacklevel=1` (the library's own line, as `TrainingArguments` does for `gradient_checkpointing`) becomes 2;
- frames that only pass a call through are skipped: `nn.Module.__call__` (a deprecated `forward` argument),
  `functools` and transformers' decorator wrappers, dataclass-generated `__init__`s, the import machinery.

So a deprecated argument we pass fails the tests, and a deprecated call a library makes into its own internals (or
into another library) stays a warning.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings

PLUMBING_MODULES = {
    "torch.nn.modules.module",
    "functools",
    "transformers.utils.generic",
    "transformers.utils.deprecation",
    "importlib._bootstrap",
    "importlib._bootstrap_external",
}


def _is_plumbing(frame: types.FrameType) -> bool:
    return frame.f_globals.get("__name__") in PLUMBING_MODULES or frame.f_code.co_filename == "<string>"


def _caller_stacklevel(stacklevel: int) -> int:
    """The stacklevel (as `warnings.warn` counts from its caller) of the frame a deprecation is attributed to."""
    stacklevel = max(stacklevel, 2)
    frame = sys._getframe(stacklevel + 1)  # 0 is this helper, 1 the wrapper, 2 the caller of `warnings.warn`
    while frame is not None and _is_plumbing(frame):
        frame, stacklevel = frame.f_back, stacklevel + 1
    return stacklevel


def attribute_to_callers() -> None:
    """Installs the `warnings.warn` wrapper (once)."""
    if getattr(warnings.warn, "attributes_to_callers", False):
        return
    original = warnings.warn

    @functools.wraps(original)
    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        category = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(category, (DeprecationWarning, FutureWarning)):
            stacklevel = _caller_stacklevel(stacklevel)
        return original(message, category, stacklevel + 1, source, **kwargs)

    warn.attributes_to_callers = True
    warnings.warn = warn
