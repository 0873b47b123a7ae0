"""Prefill and greedy-decode speed of a variant, in tokens per second.

Prefill: one forward over a (B, C) batch of windows, the median of `repeats` timed runs after a
warm-up. Decode: the difference between generating n+1 tokens and 1 token from the same prompt,
so the prompt's own prefill cancels out; greedy, with the variant's KV cache.

A variant whose library measures itself (llama.cpp's performance counters) may offer
`own_speed(window, prompt, n) -> {"prefill_tokens_per_s", "decode_tokens_per_s", "source"}`.
Its figures are then the reported prefill and decode speeds, since they are what that library's
users see; our timers' figures are kept beside them (`timer_*`), so the harness's overhead shows.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from ..variant import Variant


@dataclass(frozen=True)
class Speed:
    prefill_tokens_per_s: float  # batch size 1
    prefill_batch_tokens_per_s: float  # batch size `batch_size`
    decode_tokens_per_s: float
    batch_size: int
    context: int
    decode_tokens: int
    speed_source: str = "timer"  # who measured prefill/decode: our timers, or the variant's library
    timer_prefill_tokens_per_s: float | None = None  # ours, when the library's figures are reported
    timer_decode_tokens_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefill_tokens_per_s(variant: Variant, windows: torch.Tensor, repeats: int = 3) -> float:
    """(B, C) windows; tokens processed per second in one forward."""
    return windows.numel() / _timed(lambda: variant.logits(windows), variant.device, repeats)


def decode_tokens_per_s(variant: Variant, prompt: torch.Tensor, n: int = 32, repeats: int = 1) -> float:
    """Greedy tokens per second after the prompt. Where the variant hands out its cached decode
    step (`decoder(prompt)`, after an untimed prefill), n steps are timed; otherwise the time of
    generating 1 token is taken from that of n + 1, and a difference lost in timing noise is an
    error, not a figure."""
    decoder = getattr(variant, "decoder", None)
    if decoder is not None:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            step = decoder(prompt)  # the prompt's prefill, outside the timer
            _sync(variant.device)
            t = time.perf_counter()
            for _ in range(n):
                step()
            _sync(variant.device)
            times.append(time.perf_counter() - t)
        return n / statistics.median(times[1:])
    t1 = _timed(lambda: variant.generate(prompt, 1), variant.device, repeats)
    tn = _timed(lambda: variant.generate(prompt, n + 1), variant.device, repeats)
    if tn <= t1:
        raise RuntimeError(
            f"{variant.name}: generating {n + 1} tokens took {tn:.4f} s, no longer than 1 token ({t1:.4f} s): "
            "timing noise; measure with more decode tokens (--decode-tokens)"
        )
    return n / (tn - t1)


def measure_speed(variant: Variant, windows: torch.Tensor, batch_size: int = 4, decode_tokens: int = 32) -> Speed:
    one = windows[:1]
    batch = windows[: max(1, batch_size)]
    if batch.shape[0] < batch_size:  # fewer windows than the batch: repeat them
        batch = windows[torch.arange(batch_size) % windows.shape[0]]
    prompt = windows[:1, :16]
    speed = Speed(
        prefill_tokens_per_s=prefill_tokens_per_s(variant, one),
        prefill_batch_tokens_per_s=prefill_tokens_per_s(variant, batch, repeats=1) if batch_size > 1 else float("nan"),
        decode_tokens_per_s=decode_tokens_per_s(variant, prompt, decode_tokens),
        batch_size=batch_size,
        context=windows.shape[1],
        decode_tokens=decode_tokens,
    )
    own_speed = getattr(variant, "own_speed", None)
    if own_speed is None:
        return speed
    own = own_speed(one, prompt, decode_tokens)
    return replace(
        speed,
        prefill_tokens_per_s=own["prefill_tokens_per_s"],
        decode_tokens_per_s=own["decode_tokens_per_s"],
        speed_source=own["source"],
        timer_prefill_tokens_per_s=speed.prefill_tokens_per_s,
        timer_decode_tokens_per_s=speed.decode_tokens_per_s,
    )
