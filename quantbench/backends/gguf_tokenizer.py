"""The tokenizer half of a GGUF file: `tokenizer.ggml.*` keys, as llama.cpp reads them.

Two sources:
  * a model loaded from a GGUF file: every `tokenizer.*` key of the source file is copied as
    it is (tokens, merges, token types, special ids, pre-tokenizer name, add_bos flag, chat
    template), so llama.cpp tokenizes exactly as it does with the source file;
  * a transformers fast tokenizer holding a byte-level BPE (GPT-2, Llama 3, SmolLM and most
    current models): tokens by id, merges, token types (added special tokens are CONTROL,
    other added tokens USER_DEFINED, as convert_hf_to_gguf.py does), special ids and the
    add_bos/add_eos flags read off an actual encoding.

llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. We name it
only for the two pre-tokenizer shapes whose llama.cpp regex we know to be the same as the
tokenizer's own: plain `ByteLevel` with the GPT-2 regex ("gpt-2"), and single digits followed by
that ByteLevel ("smollm"); for anything else the export fails with the reason instead of
writing a file that would tokenize differently.

Vocabulary policy: a tokenizer with fewer tokens than the model's embedding has rows is padded
with "[PAD{i}]" tokens of type UNUSED (convert_hf_to_gguf.py's convention for padded
embeddings); one with more tokens than rows does not match the model and is an error.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType


class TokenizerExportError(ValueError):
    """The tokenizer cannot be written to a GGUF file llama.cpp would read the same way."""


def copy_gguf_tokenizer(reader: GGUFReader, writer: GGUFWriter, n_vocab: int) -> None:
    """Copy every `tokenizer.*` key of a GGUF file, checking its vocabulary against `n_vocab`."""
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise TokenizerExportError("the source GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer to copy")
    n_tokens = len(fields["tokenizer.ggml.tokens"].data)
    if n_tokens != n_vocab:
        raise TokenizerExportError(
            f"the source GGUF tokenizer has {n_tokens} tokens but the model's embedding has {n_vocab} rows: "
            "a tokenizer that does not match the model"
        )
    for key, f in fields.items():
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    def byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and byte_level(parts[1])
        ):
            return "smollm"
    raise TokenizerExportError(
        f"cannot name a llama.cpp pre-tokenizer for this tokenizer's pre-tokenizer {json.dumps(pre)[:200]}; "
        "quantbench writes byte-level BPE tokenizers whose pre-tokenizer is ByteLevel (gpt-2) or single "
        "digits + ByteLevel (smollm), and copies the tokenizer of a model loaded from a .gguf file"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    # tokenizers < 0.20 writes merges as "a b", later versions as ["a", "b"]
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def write_hf_tokenizer(tok: Any, writer: GGUFWriter, n_vocab: int) -> None:
    """Write a transformers fast tokenizer holding a byte-level BPE."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerExportError(
            f"{type(tok).__name__} is not a fast tokenizer; GGUF export needs the tokenizers-backed "
            "(tokenizer.json) form of a byte-level BPE"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerExportError(
            f"the tokenizer's model is {model.get('type')!r}; quantbench writes byte-level BPE tokenizers "
            "(and copies the tokenizer of a model loaded from a .gguf file)"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = tok.get_vocab()
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise TokenizerExportError(
            f"the tokenizer has {size} tokens but the model's embedding has {n_vocab} rows: "
            "a tokenizer that does not match the model"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for i, added in tok.added_tokens_decoder.items():
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            add(value)
    ids = tok("a")["input_ids"]  # what the tokenizer really adds around a text
    writer.add_add_bos_token(bool(ids) and ids[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tok.eos_token_id and len(ids) > 1)
    if isinstance(getattr(tok, "chat_template", None), str):
        writer.add_chat_template(tok.chat_template)


def write_tokenizer(writer: GGUFWriter, tokenizer: Any, n_vocab: int, source_gguf: str | None) -> None:
    """The source GGUF's tokenizer when there is one, else the transformers tokenizer."""
    if source_gguf:
        copy_gguf_tokenizer(GGUFReader(source_gguf), writer, n_vocab)
    else:
        write_hf_tokenizer(tokenizer, writer, n_vocab)
