"""Issue 3's memory bar: a model whose linear layers are swapped to 4-bit QTensors stores the
packed size (within 1% of the theory) and the process's resident memory falls accordingly.

In a fresh interpreter, the embedded model (SmolLM2-135M, fp32) is loaded and its resident set
read; then every decoder linear layer is swapped, one at a time, to a QLinear holding an
`int:bits=4,group=64,sym=false` QTensor, freed memory is handed back to the OS (`malloc_trim`),
and the resident set read again. The fall must reach FALL of what the weights themselves shed
(their fp32 bytes minus their packed bytes): what is left over is allocator slack, not a float
copy kept alive. Linux only (it reads /proc/self/status and calls glibc's malloc_trim).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

FALL = 0.9  # the resident set falls by at least this share of the bytes the weights shed

SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, json
    import torch
    from quantbench.layers import LayerRule, get_weight, quantize_layers, weight_bytes
    from quantbench.sources import load_reference

    def rss():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    model = load_reference("smollm2-135m").model
    names = LayerRule().select(model)
    float_bytes = sum(get_weight(model.get_submodule(n)).numel() * 4 for n in names)
    before_rss, before_bytes = rss(), weight_bytes(model)
    quantize_layers(model, names, lambda name, w: "int:bits=4,group=64,sym=false")
    qs = [model.get_submodule(n).qtensor for n in names]
    packed = sum(q.nbytes for q in qs)
    theory = sum(q.config.bits_per_weight(tuple(q.shape)) * q.numel / 8 for q in qs)
    print(json.dumps(dict(layers=len(names), float_bytes=float_bytes, packed_bytes=packed, theory_bytes=theory,
                          before_rss=before_rss,
                          after_rss=rss(), before_bytes=before_bytes, after_bytes=weight_bytes(model))))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and calls glibc's malloc_trim")
def test_swapping_to_4_bit_frees_what_the_weights_shed():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    shed = m["float_bytes"] - m["packed_bytes"]
    fell = m["before_rss"] - m["after_rss"]
    said = (
        f"{m['layers']} linear layers, {m['float_bytes'] / 1e6:.1f} MB fp32 -> {m['packed_bytes'] / 1e6:.1f} MB packed "
        f"(weight bytes {m['before_bytes'] / 1e6:.1f} -> {m['after_bytes'] / 1e6:.1f} MB); resident set "
        f"{m['before_rss'] / 1e6:.1f} -> {m['after_rss'] / 1e6:.1f} MB, a fall of {fell / 1e6:.1f} MB "
        f"= {fell / shed:.1%} of the {shed / 1e6:.1f} MB the weights shed (bar {FALL:.0%})"
    )
    print(said)
    assert abs(m["packed_bytes"] / m["theory_bytes"] - 1) <= 0.01, f"packed bytes vs theory {m['theory_bytes']:.0f}: {said}"
    assert m["before_bytes"] - m["after_bytes"] == shed, said  # the model's own count agrees
    assert fell >= FALL * shed, said
