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

Two more costs of Triton's Python frontend are paid once instead of on every op
(``install_shape_caches``: a result's ``block_type`` and ``tl.tensor`` shape; ``install_dtype_table``:
the interpreter's Triton-to-numpy dtype map). With the three, the interpreted kernel tests take
about 30-45% less CPU time than with the first alone.

All three are installed only under ``TRITON_INTERPRET=1`` (``_common``), for the whole process;
where Triton's internals differ (another version), nothing is installed and the interpreter runs
as shipped.
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


# ---------------------------------------------------------------------------------------------
# Block types and tensor shapes built once per shape


def _int_shape(shape, tl_tuple, constexpr):
    """``shape`` (a list or a ``tl.tuple`` of ints or int constexprs: what ``block_type`` takes) as
    a tuple of ints; None for anything else (left to Triton)."""
    values = shape.values if type(shape) is tl_tuple else shape
    if type(values) is not list:
        return None
    out = []
    for s in values:
        if type(s) is constexpr:
            s = s.value
        if type(s) is not int:
            return None
        out.append(s)
    return tuple(out)


def install_shape_caches() -> bool:
    """Build each block type's shape, and each tensor's, once per shape rather than on every op.

    An interpreted op makes a ``block_type`` and a ``tl.tensor`` for its result; their
    constructors turn the shape into a ``tl.tuple`` of constexprs, check it (powers of two) and
    name it: about 7 us of Python an op for the two (2 cached), run once per op per program per
    loop step. Here a shape seen before takes the tuple, numel and name Triton built for it the
    first time (shared: Triton's frontend and interpreter never mutate them, 3.6-3.7.1); a new
    one goes through Triton's own code, so its checks and errors are Triton's. Installed only
    where the constructors leave what this copies (checked on a sample), else Triton runs as
    shipped."""
    try:
        from triton.language import core
    except ImportError:  # pragma: no cover - depends on the Triton build
        return False
    block_init, tensor_init = core.block_type.__init__, core.tensor.__init__
    if getattr(block_init, "_boft_triton_cached", False):
        return True
    tl_tuple, constexpr = core.tuple, core.constexpr
    blocks: dict = {}  # int shape -> (tl.tuple shape, numel, its str)
    tensors: dict = {}  # int shape -> (tl.tuple of constexprs, numel constexpr)

    def cached_block_init(self, element_ty, shape):
        key = _int_shape(shape, tl_tuple, constexpr)
        hit = blocks.get(key) if key is not None else None
        if hit is None:
            block_init(self, element_ty, shape)  # Triton's checks and errors
            if key is not None:
                blocks[key] = (self.shape, self.numel, str(self.shape))
            return
        self.element_ty = element_ty
        self.shape, self.numel, text = hit
        self.name = f"<{text}, {element_ty}>"

    def cached_tensor_init(self, handle, type):
        key = _int_shape(type.shape, tl_tuple, constexpr) if type.is_block() else ()
        hit = tensors.get(key) if key is not None else None
        if hit is None:
            tensor_init(self, handle, type)
            if key is not None:
                tensors[key] = (self.shape, self.numel)
            return
        self.handle = handle
        self.shape, self.numel = hit  # Triton's attribute order
        self.type = type
        self.dtype = type.scalar

    if not _same_as_triton(core, block_init, tensor_init, cached_block_init, cached_tensor_init):
        return False
    cached_block_init._boft_triton_cached = True
    cached_block_init._boft_triton_real, cached_tensor_init._boft_triton_real = block_init, tensor_init
    core.block_type.__init__, core.tensor.__init__ = cached_block_init, cached_tensor_init
    return True


def attributes(obj) -> list:
    """An object's attributes as (type, repr) pairs, in order: tells ``constexpr[16]`` from 16 and a
    ``tl.tuple`` from a tuple."""
    return [(k, type(v), repr(v)) for k, v in vars(obj).items()]


def _same_as_triton(core, block_init, tensor_init, cached_block_init, cached_tensor_init) -> bool:
    """Whether the cached constructors leave the attributes Triton's do (types and values, in
    order), on a few shapes twice (the miss and the hit) and a 0-d tensor, with a ``tl.tuple`` for
    the block's shape (an older Triton's list would be mutable, and shared)."""
    try:
        for shape in ([16], core.tuple([16, 32]), [core.constexpr(4), 8, 2]):
            for dtype in (core.float32, core.bfloat16):
                ref_block = core.block_type.__new__(core.block_type)
                block_init(ref_block, dtype, shape)
                ref_tensor = core.tensor.__new__(core.tensor)
                tensor_init(ref_tensor, None, ref_block)
                if type(ref_block.shape) is not core.tuple:
                    return False
                for _ in range(2):
                    block = core.block_type.__new__(core.block_type)
                    cached_block_init(block, dtype, shape)
                    tensor = core.tensor.__new__(core.tensor)
                    cached_tensor_init(tensor, None, block)
                    if (attributes(block) != attributes(ref_block) or block != ref_block
                            or attributes(tensor) != attributes(ref_tensor)):
                        return False
        for _ in range(2):
            ref_scalar, scalar = core.tensor.__new__(core.tensor), core.tensor.__new__(core.tensor)
            tensor_init(ref_scalar, None, core.float32)
            cached_tensor_init(scalar, None, core.float32)
            if attributes(scalar) != attributes(ref_scalar):
                return False
    except Exception:  # pragma: no cover - another Triton's internals
        return False
    return True


def install_dtype_table() -> bool:
    """The interpreter's ``_get_np_dtype`` (Triton type -> numpy dtype, asked on every load, cast
    and arithmetic op) builds its 18-entry table on every call; here each type's answer is kept
    the first time Triton gives it, keyed by the type's class and name: the answer depends on
    nothing else (every pointer is uint64, whatever its address space; a block's name holds its
    element type's)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - depends on the Triton build
        return False
    real = getattr(interpreter, "_get_np_dtype", None)
    if real is None:
        return False
    if getattr(real, "_boft_triton_cached", False):
        return True
    answers: dict = {}

    def get_np_dtype(tt_dtype):
        name = getattr(tt_dtype, "name", None)
        if type(name) is not str:
            return real(tt_dtype)
        key = (type(tt_dtype), name)
        hit = answers.get(key)
        if hit is None:
            hit = answers[key] = real(tt_dtype)
        return hit

    get_np_dtype._boft_triton_cached, get_np_dtype._boft_triton_real = True, real
    interpreter._get_np_dtype = get_np_dtype
    return True
