"""Fused CPU kernels for the ggml codecs (and one for the evaluation): plain torch functions compiled
by torch.compile (inductor).

Why: eager torch runs every op as its own pass over memory, while ggml's quantizers keep a
block in registers from the first load to the last byte. A k-quant scale search is a few hundred
float ops per weight, in sequential sums: eagerly that is thousands of small kernel launches per
chunk. Inductor fuses one call of a function below into a single C++ loop over the sub-blocks,
SIMD across them, so the same torch code runs 3-7x faster on the CPU (measured on 2 cores:
gguf:Q4_K on a 256x4096 matrix 423 ms eager, 60 ms compiled; Q3_K 92 -> 30 ms).

Exactness: the codecs' functions given to `fused` are written so that compiling them cannot change a bit.
  * Every float op is elementwise, in the order written. Sums are explicit chains of adds over
    rows (`seq_sum`), never reductions, which inductor would vectorise in another order; the only
    reductions are max/min, integer sums and float sums that are exact (the Q5 types' `qh` halves:
    distinct powers of two below 2**16), whose result does not depend on order.
  * Inductor builds its C++ with -ffp-contract=off and without -funsafe-math-optimizations (pinned
    in `_OPTIONS`), so
    no product is fused into an add and nothing is reassociated; divisions stay divisions
    (1/x is `_mm256_div_ps(1, x)`, not the approximate reciprocal).
  * Casts to float16 round (`emulate_precision_casts`); by default inductor would keep float32.
  * It also builds with -fno-signed-zeros. No function here decides the sign of a zero that is
    stored: the legacy codecs flag the blocks where that sign matters and redo them eagerly.
The golden tests against libggml and gguf-py run through this path (the default on the CPU) and,
for every type, through the eager one.
One user is not a codec: the evaluation's scoring kernel (`quantbench/eval/metrics.py`,
`_chunk_sums`), whose sums are reductions by design. Compiled and eager, its figures agree to
float32 rounding, not bit for bit; each path is deterministic, and cached figures record which
one made them.

Where: CPU tensors only. On CUDA inductor emits Triton, whose float32 division is not correctly
rounded, so the same functions run eagerly there. `QUANTBENCH_COMPILE=0` turns compilation off;
if compiling a function fails (no C++ compiler), it warns once and runs eagerly from then on. The first call
of each function compiles it: a few seconds for a legacy type, up to a minute and a half for a
k-quant's candidate search on 2 cores; inductor caches the result on disk for later processes.

The switch and the compiled functions are process state, not format state: they choose how the
same arithmetic is executed, never what it computes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import warnings
from collections.abc import Callable, Iterator

import torch

# Inductor skips the rounding of a float32 -> float16 -> float32 round trip unless told to emulate
# it; the k-quants requantize against the fp16 value of their scales, so it must be kept. The C++
# flags are inductor's defaults, pinned here so that TORCHINDUCTOR_* variables cannot change them.
_OPTIONS = {
    "emulate_precision_casts": True,
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
}
_state = {"enabled": os.environ.get("QUANTBENCH_COMPILE", "1") != "0"}


def fused(fn: Callable, graphs: int | None = None) -> Callable:
    """Run `fn` compiled (dynamic shapes, one graph) when its first argument is a CPU tensor.

    A function that fails to compile (no C++ compiler, an op inductor cannot lower) warns once
    and runs eagerly from then on: the eager function is the same arithmetic.

    Dynamo compiles a new graph when a guard fails (another thread count, inference tensors where
    plain ones were, a size class its shapes were specialised on), and past its recompile limit
    (8) that is a failure. `graphs` raises the limit for this function's calls: a function whose
    compiled and eager results differ in rounding (the scoring kernel) must not change path in
    the middle of a process.

    Dynamo keeps compiled graphs, and counts recompilations against its limit, per code object.
    Functions that a factory makes from one closure share theirs, and the legacy codecs' four
    kernels hit the limit together (each type's constants, its 0/1 shape specialisations), so
    the function compiled is a copy of `fn` with a code object of its own."""
    fn_copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    fn_copy.__qualname__ = fn.__qualname__
    compiled: Callable | None = None
    failed = False

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled, failed
        if not compiles_for(args[0]):
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn_copy, dynamic=True, fullgraph=True, options=_OPTIONS)
        try:
            if graphs is None:
                return compiled(*args)
            with torch._dynamo.config.patch(recompile_limit=graphs):
                return compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same math, eagerly
            failed = True
            first = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(
                f"quantbench: torch.compile of {fn.__qualname__} failed ({type(e).__name__}: {first}); it runs "
                "eagerly from now on (the same arithmetic, slower). QUANTBENCH_COMPILE=0 skips compiling.",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args)

    def compiles_for(x: torch.Tensor) -> bool:
        """Whether a call on `x` runs compiled (CPU, compiling on, no earlier failure)."""
        return not failed and _state["enabled"] and x.device.type == "cpu"

    call.eager = fn
    call.compiles_for = compiles_for
    return call


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run every fused function eagerly inside the block (the tests compare both paths)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def seq_sum(rows) -> torch.Tensor:
    """Sum of a sequence of equal-shaped tensors (or of a tensor's dim 0) in index order, in float32:
    `for (i...) s += t[i]` as ggml writes it, one rounded add at a time."""
    acc = rows[0]
    for i in range(1, len(rows)):
        acc = acc + rows[i]
    return acc
