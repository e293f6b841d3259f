"""Wan's prompt handling: clean → tokenize (T5 rules) → encoder → keep the real rows, zero the rest.

Matches diffusers `WanPipeline._get_t5_prompt_embeds` with transformers' `T5TokenizerFast`, using only the
`tokenizers` library and the `tokenizer.json` file:

- `prompt_clean`: diffusers' `prompt_clean` without its optional `ftfy.fix_text` step (ftfy is not a
  dependency; diffusers also skips it when ftfy is not installed). With ftfy installed diffusers would
  additionally repair mojibake and straighten curly quotes, so such prompts can tokenize differently.
- `encode_prompts`: `tokenizer(prompts, padding="max_length", max_length=L, truncation=True,
  add_special_tokens=True)`. transformers' T5 tokenizer replaces whatever post-processor the tokenizer.json
  declares with the template `$A </s>`; we do the same by encoding without the file's post-processor and
  appending `</s>` ourselves, so EOS is never added twice. Truncation keeps the first L - 1 tokens and then
  `</s>`; it is reported with a warning instead of silently.
- `wan_text_context`: encoder output (B, L, D) with rows at or past the real length (EOS included) set to 0.
"""

from __future__ import annotations

import html
import os
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from sdjax.models.weights import WeightsError

EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# diffusers uses the `regex` module, whose `\s` is Unicode White_Space; Python's `re` `\s` also matches the
# ASCII separators U+001C..U+001F. Exclude those to get exactly diffusers' character class.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


class TokenizerError(WeightsError):
    """A tokenizer file that is missing or cannot be used for Wan prompts."""


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `tokenizers.Tokenizer` from `tokenizer.json` or from a directory holding it (e.g. `tokenizer/`)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file}: missing (sdjax reads the fast-tokenizer file tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise TokenizerError(f"{file}: cannot be read as a tokenizers tokenizer.json ({e})") from None
    for token in (EOS_TOKEN, PAD_TOKEN):
        if tokenizer.token_to_id(token) is None:
            raise TokenizerError(f"{file}: has no {token!r} token (a T5 tokenizer needs {EOS_TOKEN!r} and "
                                 f"{PAD_TOKEN!r})")
    # Padding and truncation are decided per call (as transformers does), never by settings stored in the file.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean` minus ftfy: double html-unescape, strip, collapse whitespace, strip."""
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def encode_prompts(tokenizer: Tokenizer, prompts: list[str],
                   max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (input_ids (B, L) int32, attention_mask (B, L) int32), L = max_sequence_length.

    Each row is the prompt's tokens followed by `</s>`, right-padded with `<pad>`; a prompt that needs more than
    L tokens (EOS included) is cut to L - 1 tokens + `</s>`, with a warning. Prompts are tokenized as given:
    apply `prompt_clean` first to reproduce Wan's pipeline.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
    eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    if eos is None or pad is None:
        raise TokenizerError(f"tokenizer has no {EOS_TOKEN!r} / {PAD_TOKEN!r} token")
    L = max_sequence_length
    ids = np.full((len(prompts), L), pad, np.int32)
    mask = np.zeros((len(prompts), L), np.int32)
    for b, encoding in enumerate(tokenizer.encode_batch(prompts, add_special_tokens=False)):
        tokens = encoding.ids
        if len(tokens) + 1 > L:
            warnings.warn(f"prompt {b} has {len(tokens) + 1} tokens (EOS included), more than "
                          f"max_sequence_length={L}; it is truncated to {L} tokens", stacklevel=2)
            tokens = tokens[: L - 1]
        row = [*tokens, eos]
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return ids, mask


def wan_text_context(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """hidden (B, L, D), attention_mask (B, L) -> (B, L, D): the first mask.sum() rows kept, the rest zero.

    Wan's DiT sees all L rows; the rows past the real length must be exactly zero (diffusers trims to
    `mask.sum()` and re-pads with zeros).
    """
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"wan_text_context: hidden must be (B, L, D) and attention_mask (B, L); got "
                         f"{hidden.shape} and {attention_mask.shape}")
    seq_lens = jnp.sum(attention_mask > 0, axis=1)  # (B,)
    keep = jnp.arange(hidden.shape[1])[None, :] < seq_lens[:, None]  # (B, L)
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))
