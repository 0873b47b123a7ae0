"""GPTQModel's GPTQ on a float model, as a reference for quantbench's own.

Run with the python of the GPTQModel environment (benchmarks/references/setup_venvs.sh):

    $QB_GPTQMODEL_PYTHON benchmarks/references/gptqmodel_job.py --model DIR \
        --calib calib.safetensors --out OUT --method gptq --bits 4 --group 64 --no-sym

Settings as quantbench's defaults (job.py): `bits`, `group_size`, `sym`, `damp_percent` = `--damp`,
`desc_act` = `--act-order`, and `act_group_aware=False` (GPTQModel turns its own activation
ordering on by default; quantbench's GPTQ visits columns in order unless asked), `lm_head=False`.
GPTQModel's block size is fixed at 128, quantbench's default. `offload_to_disk=False`: by default
GPTQModel writes each finished module to disk to save memory, which a 135M model does not need,
and which leaves the modules on the meta device where their weights cannot be read back; it
only moves tensors, so it changes no weight (and can only make GPTQModel's time shorter). Its `damp_auto_increment` (raise the
dampening when a Cholesky factorisation fails) stays on: it only acts where ours would raise.

The timed job is `model.quantize(...)` as a user calls it, packing into its QuantLinear
modules included. The quantized model is then saved and loaded back with GPTQModel (untimed),
and the fake-quantized weights are read through each loaded module's own `dequantize_weight()`,
checked against the module's forward on a random input.

GPTQModel runs its CPU work in a pool of workers; on 2 cores it needs GPTQMODEL_CPU_WORKERS=2,
set here unless the caller set it. GPTQModel's AWQ is not run: it needs fp16/bf16 weights, and
on the embedded model it scored worse than round-to-nearest.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # before gptqmodel is imported

import torch
from job import Job, logits_gap, parse_job, write_outputs


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """The float weight (out, in) of a GPTQModel QuantLinear, checked against its forward."""
    scales = module.scales
    module.scales = scales.float()  # (q - z) * s in float32: exact, as the stored fp16 scale allows
    try:
        w = module.dequantize_weight().float()  # (in, out): the GPTQ checkpoint layout
    finally:
        module.scales = scales
    if w.shape != (module.in_features, module.out_features):
        raise ValueError(f"dequantize_weight gave {tuple(w.shape)}, expected ({module.in_features}, {module.out_features})")
    w = w.t().contiguous()  # (out, in)
    x = torch.randn(3, module.in_features, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = module(x.to(module.scales.dtype)).float()
    bias = module.bias.float() if getattr(module, "bias", None) is not None else 0.0
    want = x @ w.t() + bias
    gap = (y - want).norm() / want.norm()
    # The forward runs in float16 (unit roundoff about 5e-4 per operation): the bar leaves room
    # for that. It is there to catch weights read off the grid the forward uses (as
    # right after quantize(), see main), not float16 rounding.
    if gap > 1e-2:
        raise ValueError(f"{type(module).__name__}: dequantize_weight() disagrees with the module's forward (relative gap {gap:.2e})")
    return w


def main() -> None:
    job = parse_job(("gptq",))
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    ids = job.input_ids()  # (N, L)
    config = QuantizeConfig(
        bits=job.bits, group_size=job.group, sym=job.sym, desc_act=job.act_order, act_group_aware=False,
        damp_percent=job.damp, lm_head=False, offload_to_disk=False,
    )
    model = GPTQModel.load(str(job.model), config, dtype=torch.float32, device="cpu")
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    t = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    seconds = time.perf_counter() - t
    # Read right after quantize(), every weight came out one step of its group off (mean error
    # +1.00 step on a tiny random Llama; llm-compressor's and the reloaded checkpoint's: 0.00), as
    # if the packed zero points were still in the checkpoint's layout, stored minus one, which
    # GPTQModel converts when it loads one. So the model is saved and loaded back, as a user of
    # the library would run it.
    checkpoint = job.out / "checkpoint"
    model.save(str(checkpoint))
    # Its plain torch kernel, whose dequantize_weight() is the reference formula, runs only in
    # float16 or bfloat16; the weights are read in float32 all the same (dequantized() above),
    # and GPTQ changes no other parameter, so nothing else is taken from the float16 model.
    loaded = GPTQModel.load(str(checkpoint), dtype=torch.float16, device="cpu", backend=BACKEND.TORCH)
    linears = {name: dequantized(m) for name, m in loaded.model.named_modules() if hasattr(m, "dequantize_weight")}
    gap = logits_gap(job, loaded.model.float(), {f"{k}.weight": v for k, v in linears.items()})
    write_outputs(
        job, linears, {}, "gptqmodel", gptqmodel.__version__, seconds,
        cpu_workers=os.environ["GPTQMODEL_CPU_WORKERS"], logits_gap=gap,
    )


if __name__ == "__main__":
    main()
