"""llama.cpp as a variant: a GGUF file scored on exactly the token ids a torch variant sees.

`LlamaCppVariant` drives libllama through llama-cpp-python's C bindings (`llama_cpp.llama_*`)
rather than its `Llama` class: `Llama(logits_all=True)` keeps an n_ctx x n_vocab score matrix
and a token history of its own (about 100 MB for 512 tokens of a 49,152-token vocabulary), which
the variant does not need and the memory bar cannot afford. What the variant does:

  * one llama.cpp context whose n_ctx is the longest window seen (recreated if a longer one
    comes); the KV cache is cleared before every window, so each window is scored alone,
    exactly like one forward of a torch model;
  * a window is decoded in consecutive chunks of `ubatch` tokens (n_batch = n_ubatch = ubatch)
    with logits requested for every position; the KV cache carries the earlier chunks, so the
    logits are those of one pass over the window. Chunking bounds llama.cpp's output and
    compute buffers, each of which holds chunk x n_vocab floats: for a 512-token window of a
    49,152-token vocabulary, one chunk would cost about 200 MB in llama.cpp alone, twice the
    embedded model's Q4_K_M file. 32 keeps the Q4_K_M variant within 1.5x its file size plus
    the KV cache (measured 155 MiB against a 162 MiB bar), at the speed of one 512-token batch
    on an idle machine (115 vs 112-116 tokens/s measured; on an oversubscribed one, where
    llama.cpp's spinning threads wait at every graph barrier, fewer and larger chunks are
    faster: `ubatch=` sets it);
  * n_threads = the cores this process may run on; flash attention off, as `Llama` defaults;
  * weights in llama.cpp's extra CPU buffer types (its repacked layouts), as llama.cpp loads
    them by default, except on a CPU with AMX, where its AMX kernels crash (`default_repack`);
  * `own_speed` reports prefill and decode tokens/s from llama.cpp's own counters
    (`llama_perf_context`: prompt-eval and eval time and token counts), next to our timers.

A GGUF file's header is read and checked (`gguf_header`) before llama.cpp sees it, so a corrupt
or truncated file and an architecture llama.cpp does not know give errors that say so;
libllama's log is kept (not printed) and its error lines are quoted when loading fails.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .gguf_header import GGUFFileError, inspect_gguf  # noqa: F401  (GGUFFileError: re-exported)


class _Log:
    """libllama's log, kept in memory: quiet on success, quoted in errors on failure."""

    ERROR = 3  # ggml_log_level GGML_LOG_LEVEL_ERROR
    lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)
    _callback = None

    @classmethod
    def install(cls) -> None:
        import llama_cpp

        if cls._callback is None:
            @llama_cpp.llama_log_callback
            def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
                cls.lines.append((level, text.decode("utf-8", "replace")))

            cls._callback = callback  # referenced here so ctypes does not free it
            llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(cls._callback, ctypes.c_void_p(0))
        cls.lines.clear()

    @classmethod
    def tail(cls) -> str:
        """The error lines logged since `install`, else the last few lines, on one line."""
        errors = [t for level, t in cls.lines if level == cls.ERROR] or [t for _, t in list(cls.lines)[-4:]]
        return " | ".join(t.strip() for t in errors if t.strip())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux: the amx_tile flag in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def default_repack() -> bool:
    """Whether to load weights into llama.cpp's extra CPU buffer types (its repacked layouts), as
    llama.cpp does by default: yes, except on a CPU with AMX. There llama.cpp puts its AMX buffer
    first, and with llama-cpp-python 0.3.36 `ggml_backend_amx_mul_mat` crashes the process
    (SIGSEGV) at the first decode of the embedded model in Q8_0, Q4_0, Q5_0, Q4_K_S, Q6_K and
    Q4_K_M, through `Llama` as well (seen on a Sapphire Rapids Xeon, where AMX instructions
    themselves run). Without the extra buffers llama.cpp runs its plain CPU kernels."""
    return not cpu_has_amx()


def direct_llama(path: str | os.PathLike[str], **kwargs):
    """llama-cpp-python's own `Llama` on a file, for comparisons with the harness (tests and
    benchmarks), loaded with `default_repack`'s choice of extra CPU buffers. `Llama` takes no
    argument for that, so the default model parameters it starts from are given the setting."""
    from unittest import mock

    import llama_cpp

    defaults = llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = default_repack()
        return p

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params):
        return llama_cpp.Llama(str(path), **kwargs)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LlamaCppVariant:
    """A GGUF file run by llama.cpp, meeting the evaluation through the Variant protocol.

    `cleanup` lists files and directories that belong to the variant (temporary exports) and
    are deleted by `close()`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        n_weights: int = 0,
        layer_specs: dict[str, str] | None = None,
        expected_vocab: int | None = None,
        threads: int = 0,
        ubatch: int = 32,
        repack: bool | None = None,
        cleanup: tuple[str | os.PathLike[str], ...] = (),
    ):
        import llama_cpp

        self._L = llama_cpp
        self._cleanup = [Path(c) for c in cleanup]
        self._model = self._ctx = self._batch = None
        try:
            self.info = inspect_gguf(path)
            self.name = name
            self.n_weights = n_weights or self.info.n_elements
            self.layer_specs = layer_specs if layer_specs is not None else {
                k: f"gguf:{v}" for k, v in self.info.tensor_types.items()
            }
            self.threads = threads or cores()
            self.ubatch = ubatch
            self.n_ctx = 0
            _Log.install()
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = 0
            # llama.cpp's CPU weight repacking (interleaved rows for SIMD)
            mparams.use_extra_bufts = default_repack() if repack is None else repack
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
            if not self._model:
                raise GGUFFileError(
                    f"llama.cpp could not load {path} (architecture {self.info.architecture!r}): {_Log.tail()}"
                )
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
            if expected_vocab is not None and self.n_vocab != expected_vocab:
                raise GGUFFileError(
                    f"{path}: llama.cpp's vocabulary has {self.n_vocab} tokens but the model expects {expected_vocab}: "
                    "a tokenizer that does not match the model"
                )
        except BaseException:
            self.close()
            raise

    device = torch.device("cpu")

    # -- llama.cpp plumbing ------------------------------------------------------------------
    def _ensure_context(self, n_ctx: int) -> None:
        L = self._L
        if self._ctx is not None and n_ctx <= self.n_ctx:
            return
        if self._ctx is not None:
            L.llama_free(self._ctx)
            self._ctx = None
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = self.ubatch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = False
        self._ctx = L.llama_init_from_model(self._model, p)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens: {_Log.tail()}")
        self.n_ctx = n_ctx
        if self._batch is None:
            self._batch = L.llama_batch_init(self.ubatch, 0, 1)
            b = self._batch
            for i in range(self.ubatch):  # every token belongs to sequence 0
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
            self._tok = np.ctypeslib.as_array(b.token, shape=(self.ubatch,))
            self._pos = np.ctypeslib.as_array(b.pos, shape=(self.ubatch,))
            self._out = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(self.ubatch,))

    def _clear(self) -> None:
        self._L.llama_memory_clear(self._L.llama_get_memory(self._ctx), True)

    def _decode(self, tokens: np.ndarray, pos0: int, all_logits: bool) -> np.ndarray:
        """Decode up to `ubatch` tokens at positions pos0..; their logits (k or 1, V), a view."""
        k = len(tokens)
        self._tok[:k] = tokens
        self._pos[:k] = np.arange(pos0, pos0 + k)
        self._out[:k] = 1 if all_logits else 0
        self._out[k - 1] = 1
        self._batch.n_tokens = k
        rc = self._L.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}: {_Log.tail()}")
        rows = k if all_logits else 1
        ptr = self._L.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    def _prefill(self, ids: np.ndarray, out: torch.Tensor | None) -> np.ndarray:
        """Decode one sequence from position 0 in chunks; fill out (T, V) if given. Last logits."""
        self._clear()
        last = None
        for s in range(0, len(ids), self.ubatch):
            chunk = ids[s : s + self.ubatch]
            logits = self._decode(chunk, s, all_logits=out is not None)
            if out is not None:
                out[s : s + len(chunk)].copy_(torch.from_numpy(logits))
            last = logits[-1]
        return last

    # -- the Variant protocol ----------------------------------------------------------------
    def logits(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, V) float32, each row decoded alone from an empty KV cache."""
        B, T = ids.shape
        self._ensure_context(T)
        if out is None:
            out = torch.empty((B, T, self.n_vocab), dtype=torch.float32)
        elif out.shape != (B, T, self.n_vocab) or out.dtype != torch.float32 or out.device.type != "cpu":
            raise ValueError(
                f"out is {tuple(out.shape)} {out.dtype} on {out.device}; llama.cpp's logits need "
                f"({B}, {T}, {self.n_vocab}) torch.float32 on the CPU"
            )
        rows = ids.to(torch.int32).cpu().numpy()
        for b in range(B):
            self._prefill(rows[b], out[b])
        return out

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy continuation of a (1, T) prompt; a fixed number of tokens, as TorchVariant."""
        prompt = ids[0].to(torch.int32).cpu().numpy()
        self._ensure_context(len(prompt) + max_new_tokens)
        new: list[int] = []
        logits = self._prefill(prompt, None)
        for i in range(max_new_tokens):
            tok = int(np.argmax(logits))
            new.append(tok)
            if i + 1 < max_new_tokens:
                logits = self._decode(np.array([tok], dtype=np.int32), len(prompt) + i, all_logits=False)[0]
        return new

    def own_speed(self, window: torch.Tensor, prompt: torch.Tensor, n: int) -> dict[str, float | str]:
        """Prefill tokens/s over a (1, C) window and decode tokens/s over n greedy tokens, as
        llama.cpp's own performance counters measure them (compute time only)."""
        self.logits(window)  # warm-up at the window's context size
        with self.counters() as prefill:
            self.logits(window)
        with self.counters() as decode:
            self.generate(prompt, n + 1)
        return {"prefill_tokens_per_s": prefill["prefill_tokens_per_s"],
                "decode_tokens_per_s": decode["decode_tokens_per_s"], "source": "llama.cpp"}

    @contextlib.contextmanager
    def counters(self):
        """llama.cpp's own performance counters over the block, in a dict filled on exit:
        prefill_tokens_per_s (batches of more than one token) and decode_tokens_per_s (single
        tokens), NaN where none ran. They time llama_decode up to its results; copying the logits
        out is ours and not counted."""
        L = self._L
        if self._ctx is not None:  # a context made inside the block starts its counters at zero
            L.llama_perf_context_reset(self._ctx)
        got = {"prefill_tokens_per_s": float("nan"), "decode_tokens_per_s": float("nan")}
        yield got
        if self._ctx is None:
            return
        p = L.llama_perf_context(self._ctx)
        # llama.cpp reports n_eval as at least 1 even when nothing ran: the times say what ran
        if p.t_p_eval_ms > 0:
            got["prefill_tokens_per_s"] = p.n_p_eval / (p.t_p_eval_ms / 1e3)
        if p.t_eval_ms > 0:
            got["decode_tokens_per_s"] = p.n_eval / (p.t_eval_ms / 1e3)

    def weight_bytes(self) -> int:
        return self.info.tensor_bytes

    def artifact_bytes(self) -> int:
        return self.info.file_bytes

    def close(self) -> None:
        L = getattr(self, "_L", None)
        if L is not None:
            if self._batch is not None:
                L.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                L.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                L.llama_model_free(self._model)
                self._model = None
        for p in getattr(self, "_cleanup", []):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self._cleanup = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
