"""A tiny llama model with random weights, written as GGUF at test time, for a real
llama-server to load in a fraction of a second: the tests need llama.cpp's HTTP
behaviour (health, chat completions, SSE), not sensible text.

The vocabulary is SentencePiece-style: the three special tokens, the 256 byte tokens
llama.cpp's byte fallback needs, and a few hundred pieces, so any prompt tokenizes.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

_SPECIAL = ["<unk>", "<s>", "</s>"]


def _vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens = list(_SPECIAL)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [TokenType.BYTE] * 256
    pieces = ["\u2581" + c for c in string.ascii_letters] + list(string.ascii_letters)
    pieces += [*string.digits, *string.punctuation, "\u2581"]
    for piece in pieces:
        if len(tokens) >= size:
            break
        tokens.append(piece)
        types.append(TokenType.NORMAL)
    while len(tokens) < size:
        tokens.append(f"\u2581w{len(tokens)}")
        types.append(TokenType.NORMAL)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(size - 259)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: Path,
    *,
    name: str = "tiny-llama",
    layers: int = 2,
    embedding: int = 64,
    heads: int = 4,
    feed_forward: int = 128,
    vocabulary: int = 512,
    context: int = 512,
    seed: int = 0,
) -> Path:
    """Write the model to ``path``; more ``layers`` or ``embedding`` make a bigger file
    (two models of different sizes make a switch really stop one server for another)."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(embedding // heads)
    writer.add_file_type(0)  # all F32
    tokens, scores, types = _vocabulary(vocabulary)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    )

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(embedding, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(vocabulary, embedding))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weights(vocabulary, embedding))
    for block in range(layers):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", ones)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{part}.weight", weights(embedding, embedding))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", ones)
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(feed_forward, embedding))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(feed_forward, embedding))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(embedding, feed_forward))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
