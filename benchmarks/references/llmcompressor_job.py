"""llm-compressor's GPTQ or AWQ on a float model, as a reference for quantbench's own.

Run with the python of the llm-compressor environment (benchmarks/references/setup_venvs.sh):

    $QB_LLMCOMPRESSOR_PYTHON benchmarks/references/llmcompressor_job.py --model DIR \
        --calib calib.safetensors --out OUT --method gptq --bits 4 --group 64 --no-sym

The settings follow quantbench's defaults (job.py): integer weights, `--bits`, groups of
`--group` input columns, asymmetric unless `--sym`, min-max observer, every linear layer but
`lm_head`. GPTQ: `dampening_frac` = `--damp`, `block_size` = `--block`, `actorder` None unless
`--act-order` (then "weight": columns visited by decreasing H diagonal, groups kept contiguous,
the nearest to quantbench's act_order). AWQ: llm-compressor's defaults for the scale search
(`duo_scaling=True`, `n_grid=20`), followed by a QuantizationModifier with the same scheme; it
has no clipping search, which quantbench's AWQ has.

The calibration sequences go to `oneshot` in the given order as a DataLoader of one sequence a
batch (llm-compressor's default calibration batch size), so neither side shuffles or re-tokenizes.

On a machine without an accelerator, AWQ's `IntermediatesCache.pin_memory` fails (pinned memory
needs one); it is only a transfer speed-up for cached activations, so it is replaced by a no-op.
"""

from __future__ import annotations

import time

import torch
from job import Job, changed_parameters, logits_gap, on_grid, parse_job, write_outputs


def scheme(job: Job) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=job.bits, type="int", symmetric=job.sym, strategy="group", group_size=job.group)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def recipe(job: Job) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if job.method == "gptq":
        return [
            GPTQModifier(
                config_groups=scheme(job), ignore=["lm_head"], block_size=job.block, dampening_frac=job.damp,
                actorder="weight" if job.act_order else None,
            )
        ]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=scheme(job), ignore=["lm_head"])]


def disable_pin_memory_without_accelerator() -> None:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def fake_quantized(module: torch.nn.Module, job: Job) -> torch.Tensor:
    """The module's weight (out, in) on its quantization grid. After GPTQ the weight already is
    quantized and dequantized; after AWQ's QuantizationModifier it is the scaled float weight,
    which compressed-tensors quantizes in the forward, so it goes through compressed-tensors'
    own fake_quantize with the module's weight_scale, weight_zero_point and arguments."""
    w = module.weight.detach().float()
    if on_grid(w, job):
        return w
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = module.quantization_scheme.weights
    with torch.no_grad():
        return fake_quantize(module.weight.detach(), module.weight_scale, module.weight_zero_point, args).float()


def main() -> None:
    job = parse_job(("gptq", "awq"))
    import llmcompressor
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    disable_pin_memory_without_accelerator()
    ids = job.input_ids()  # (N, L)
    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(
        [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids], batch_size=1, shuffle=False
    )
    before = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    t = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe(job), num_calibration_samples=len(ids), max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - t
    quantized = {name: m for name, m in model.named_modules() if hasattr(m, "weight_scale")}
    already = all(on_grid(m.weight.detach().float(), job) for m in quantized.values())
    linears = {name: fake_quantized(m, job) for name, m in quantized.items()}
    others = changed_parameters(model, before, skip={f"{name}.weight" for name in linears})
    gap = logits_gap(job, model, {f"{k}.weight": v for k, v in linears.items()} | others)
    write_outputs(
        job, linears, others, "llmcompressor", llmcompressor.__version__, seconds,
        weights_were_fake_quantized=already, logits_gap=gap,
    )


if __name__ == "__main__":
    main()
