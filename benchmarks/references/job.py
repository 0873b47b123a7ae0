"""What every reference job shares: its command line, its inputs and its outputs.

A reference job runs in the reference library's own virtual environment (see setup_venvs.sh),
never in quantbench's, so this module imports only the standard library, torch and safetensors,
which every environment has.

Input: a float model directory in Hugging Face format, the calibration token ids (N, L) in a
safetensors file under the key `input_ids`, and the quantization settings. Output, in `--out`:

* `weights.safetensors`: the fake-quantized (quantized, then dequantized to float32) weight of
  every quantized linear layer, in (out_features, in_features) orientation, and every other
  parameter the library changed (AWQ's scales folded into the norms), keyed by parameter name
  (`model.layers.0.self_attn.q_proj.weight`): loaded into the float model, they make the
  library's quantized model.
* `job.json`: the library and its version, the settings, the wall time of the quantization job
  alone (model loading and writing the outputs excluded) the quantized layers and the other changed parameters.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
REPORT = "job.json"


@dataclass(frozen=True)
class Job:
    model: Path
    calib: Path
    out: Path
    method: str  # gptq | awq
    bits: int
    group: int
    sym: bool
    damp: float
    block: int
    act_order: bool

    def input_ids(self) -> torch.Tensor:
        ids = load_file(str(self.calib))["input_ids"]  # (N, L)
        if ids.dim() != 2:
            raise ValueError(f"{self.calib}: input_ids must be (N, L), got {tuple(ids.shape)}")
        return ids.long()


def parse_job(methods: tuple[str, ...]) -> Job:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="float model directory (Hugging Face format)")
    p.add_argument("--calib", type=Path, required=True, help="safetensors file with input_ids (N, L)")
    p.add_argument("--out", type=Path, required=True, help="directory for weights.safetensors and job.json")
    p.add_argument("--method", choices=methods, required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of the mean diagonal of H")
    p.add_argument("--block", type=int, default=128, help="GPTQ columns per lazy-batch block")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args()
    return Job(a.model, a.calib, a.out, a.method, a.bits, a.group, a.sym, a.damp, a.block, a.act_order)


def distinct_per_group(w: torch.Tensor, group: int) -> int:
    """The largest number of distinct values in one group of `group` columns of one row of w."""
    out, n = w.shape
    g = w.reshape(out * (n // group), group).sort(dim=-1).values  # (rows x groups, group)
    return int(((g[:, 1:] != g[:, :-1]).sum(dim=-1) + 1).max())


def on_grid(w: torch.Tensor, job: Job) -> bool:
    """Whether every group of w holds at most 2**bits values, as a fake-quantized weight must."""
    return distinct_per_group(w.float(), job.group) <= 2**job.bits


def changed_parameters(model: torch.nn.Module, before: dict[str, torch.Tensor], skip: set[str]) -> dict[str, torch.Tensor]:
    """The parameters of `model` not in `skip` that differ from `before` (AWQ folds its scales into
    the norms in front of the layers it scales)."""
    return {
        name: p.detach().float()
        for name, p in model.named_parameters()
        if name not in skip and name in before and not torch.equal(p.detach().float(), before[name])
    }


def logits_gap(job: Job, quantized_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> float:
    """Largest |difference| of the logits, on the first calibration sequence, between the library's
    own quantized model and the float model with `tensors` loaded: 0 up to float rounding when
    the outputs really are what the library made."""
    from transformers import AutoModelForCausalLM

    ids = job.input_ids()[:1]  # (1, L)
    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32)
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise KeyError(f"not parameters of the float model: {sorted(missing)[:4]}")
    model.load_state_dict(tensors, strict=False)
    with torch.inference_mode():
        ours = model(input_ids=ids, use_cache=False).logits.float()
        theirs = quantized_model(input_ids=ids, use_cache=False).logits.float()
    return float((ours - theirs).abs().max())


def write_outputs(
    job: Job, linears: dict[str, torch.Tensor], others: dict[str, torch.Tensor], library: str, version: str, seconds: float, **extra
) -> None:
    """`linears`: module name -> fake-quantized weight (out, in); `others`: parameter name -> any
    other parameter the library changed. Both go into one file keyed by parameter name."""
    off = {name: distinct_per_group(w.float(), job.group) for name, w in linears.items() if not on_grid(w, job)}
    if off:
        raise ValueError(f"{library}: not fake-quantized, more than {2**job.bits} values in a group: {off}")
    job.out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}.weight": v for k, v in linears.items()} | others
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(job.out / WEIGHTS))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()}
    report = {
        "library": library, "version": version, "seconds": seconds, "quantized_layers": sorted(linears),
        "other_changed_parameters": sorted(others), "settings": settings, **extra,
    }
    (job.out / REPORT).write_text(json.dumps(report, indent=1))
