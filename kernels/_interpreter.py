"""Triton's interpreter (``TRITON_INTERPRET=1``), without its per-call re-patching.

The interpreter maps ``triton.language`` onto numpy by patching the language modules a kernel's
globals hold (``_patch_lang``) when a launch starts, and restores them when it ends. It also
calls ``_patch_lang`` on every *device-function* call (each ``@triton.jit`` helper a kernel calls,
``tl.sum`` included), scanning the modules with ``inspect.getmembers`` again: about 1.5 ms a call,
and inside a row loop that is 20-40% of an interpreted launch (the coarse backward's tests: 21 s
with it, 13 s patching once). Within one launch the modules stay patched, so a second patch of
the same globals changes nothing (already-patched members are no longer builtins, and the nested
scope is never restored); only a module not seen yet in this launch
(``triton.language.standard``'s, say) needs one. ``install`` wraps ``_patch_lang`` to patch each
function's globals once per launch.

Only the interpreter is affected; where Triton's internals differ (another version), nothing is
installed and the interpreter runs as shipped.
"""

from __future__ import annotations


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang`` (once); whether it is wrapped."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - depends on the Triton build
        return False
    real, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if real is None or scope_type is None:
        return False
    if getattr(real, "_boft_triton_once_per_launch", False):
        return True
    patched: set[int] | None = None  # ids of the globals patched in the running launch (launches do not nest)

    def patch_lang(fn):
        nonlocal patched
        if patched is not None:  # a device function's call inside a launch
            if id(fn.__globals__) in patched:
                return scope_type()  # nothing to undo (the interpreter drops this scope anyway)
            patched.add(id(fn.__globals__))
            return real(fn)
        scope = real(fn)  # a launch: restored when it ends
        patched = {id(fn.__globals__)}
        restore = scope.restore

        def restore_and_forget():
            nonlocal patched
            patched = None
            restore()

        scope.restore = restore_and_forget
        return scope

    patch_lang._boft_triton_once_per_launch = True
    interpreter._patch_lang = patch_lang
    return True
