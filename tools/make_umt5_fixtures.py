"""Record tiny random transformers T5-family text encoders and a tiny tokenizer for tests/models/test_umt5.py
and tests/models/test_tokenizer.py.

Run with the reference venv (torch + transformers + diffusers):

    /work/refvenv/bin/python tools/make_umt5_fixtures.py

Writes
- tests/fixtures/umt5_tiny/: a random `UMT5EncoderModel` (gated-gelu, relative-position bias in every layer)
  saved with `save_pretrained` (config.json + model.safetensors), and io.npz with
  `input_ids` (B,L) int32 (right-padded, EOS = 1 ends every real sequence), `attention_mask` (B,L) int32,
  `out_fp32` (B,L,D) = last_hidden_state in float32, `out_bf16` (B,L,D) = the same model loaded with
  `dtype=torch.bfloat16` (every weight bf16, as Wan's diffusers pipeline runs it), stored as float32, and
  `buckets_{num_buckets}_{max_distance}` = transformers' bidirectional relative-position bucket of every
  relative position in `rel_positions` (for the tiny config and for UMT5-XXL's 32 / 128).
- tests/fixtures/t5_tiny/: the same for a plain `T5EncoderModel` (relu FFN, bias table in layer 0 only,
  shared by all layers: the structure of diffusers' tiny Wan pipeline test).
- tests/fixtures/tokenizer_tiny/: a small Unigram tokenizer.json with a T5-like pre-tokenizer and a
  `$A </s>` template post-processor, and expected.json with the ids / masks transformers'
  `T5TokenizerFast(tokenizer_file=...)` gives after diffusers' Wan `prompt_clean` (ftfy is not installed in
  the reference venv, so `prompt_clean` = double html.unescape + strip + whitespace collapse).

Weights are re-initialised with non-trivial magnitudes so signals neither vanish nor saturate: embedding
N(0, 1), q/k N(0, 0.1^2) (logits of order 1: T5 has no 1/sqrt(d) scaling), other linear weights
N(0, 0.15^2), relative-position tables N(0, 0.5^2), norm gains 1 +- 0.1. Larger weights make the model
ill-conditioned: with 0.3 everywhere transformers' own bf16 run is 5 % (rel. L2) away from fp32; with these
values it is 0.9 % (UMT5) / 0.6 % (T5), close to what wan.md §9.3 measured.
"""

import json
import pathlib
import types

import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast, UMT5Config, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"

TINY = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, num_layers=3, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, dropout_rate=0.0)
LENGTHS = (20, 9, 1)  # real tokens (EOS included) per sample; L = 20 > max_distance exercises the far buckets
REL_POSITIONS = np.arange(-600, 601)
QK_STD, LINEAR_STD = 0.1, 0.15


def reinit_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name == "shared.weight":
                p.normal_(0.0, 1.0)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 0.5)
            elif ".q." in name or ".k." in name:
                p.normal_(0.0, QK_STD)
            else:
                p.normal_(0.0, LINEAR_STD)


def inputs(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    L = max(LENGTHS)
    ids = np.zeros((len(LENGTHS), L), np.int32)
    mask = np.zeros((len(LENGTHS), L), np.int32)
    for b, n in enumerate(LENGTHS):
        ids[b, : n - 1] = g.integers(2, vocab, n - 1)
        ids[b, n - 1] = 1  # </s>
        mask[b, :n] = 1
    return ids, mask


def buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """transformers' own bucket function, called on a stand-in `self` (encoder: bidirectional)."""
    fake = types.SimpleNamespace(relative_attention_num_buckets=num_buckets,
                                 relative_attention_max_distance=max_distance, is_decoder=False)
    rel = torch.from_numpy(REL_POSITIONS).to(torch.long)
    return UMT5Attention._relative_position_bucket(fake, rel).numpy().astype(np.int32)


def make_encoder(name: str, model_cls, config) -> None:
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    reinit_(model)
    model.save_pretrained(out, safe_serialization=True)

    ids, mask = inputs(config.vocab_size)
    with torch.no_grad():
        ref = model_cls.from_pretrained(out).eval()
        out_fp32 = ref(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).last_hidden_state
        ref16 = model_cls.from_pretrained(out, dtype=torch.bfloat16).eval()
        assert all(p.dtype == torch.bfloat16 for p in ref16.parameters())
        out_bf16 = ref16(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).last_hidden_state
    arrays = dict(input_ids=ids, attention_mask=mask, out_fp32=out_fp32.numpy(),
                  out_bf16=out_bf16.float().numpy(), rel_positions=REL_POSITIONS.astype(np.int32))
    for nb, md in ((config.relative_attention_num_buckets, config.relative_attention_max_distance), (32, 128)):
        arrays[f"buckets_{nb}_{md}"] = buckets(nb, md)
    np.savez_compressed(out / "io.npz", **arrays)
    (out / "README.txt").write_text(
        f"Random tiny {model_cls.__name__} and its outputs; regenerate with\n"
        "    /work/refvenv/bin/python tools/make_umt5_fixtures.py\n"
        "(see the script's docstring for the contents of io.npz).\n")
    rel = np.linalg.norm(out_bf16.float().numpy() - out_fp32.numpy()) / np.linalg.norm(out_fp32.numpy())
    print(f"{name}: keys {sorted(ref.state_dict())[:3]}..., |out| {out_fp32.abs().mean():.3f}, "
          f"bf16 vs fp32 rel L2 {rel:.2e}")


# ---- tokenizer -------------------------------------------------------------------------------------------

WORDS = ("a cat dog the on in sat mat red blue big small and with runs jumps over lazy fox quick brown "
         "video of slow motion city night").split()
PROMPTS = [
    "the cat sat on the mat",
    "",
    "   A  quick\tbrown fox\n\njumps over the lazy dog  ",
    "a big red dog and a small blue cat runs with the quick brown fox over the lazy mat in the city at night",
    "cat &amp;amp; dog &lt;3 \u3000 video\x1cof\x1fslow motion",
    "zebra xylophone",  # characters only: falls back to single-letter pieces
    "the cat </s> sat",  # a literal special token inside the text
]
MAX_LENGTHS = (8, 16)


def make_tokenizer() -> None:
    out = FIXTURES / "tokenizer_tiny"
    out.mkdir(parents=True, exist_ok=True)
    # T5 layout: <pad>=0, </s>=1, <unk>=2, pieces, then the sentinel <extra_id_*> tokens (T5Tokenizer adds
    # 100 of them itself when the file has none; having them in the file keeps both vocabularies equal).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz&;<>/3"]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(100)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))

    hf = T5TokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert len(hf) == tok.get_vocab_size(), (len(hf), tok.get_vocab_size())
    cleaned = [prompt_clean(p) for p in PROMPTS]
    expected = {"prompts": PROMPTS, "cleaned": cleaned, "cases": {}}
    for max_length in MAX_LENGTHS:
        enc = hf(cleaned, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                 return_attention_mask=True)
        untruncated = hf(cleaned, add_special_tokens=True)["input_ids"]
        expected["cases"][str(max_length)] = {
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "untruncated_lengths": [len(x) for x in untruncated]}
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    (out / "README.txt").write_text(
        "Tiny Unigram tokenizer.json and transformers T5TokenizerFast's ids for Wan-cleaned prompts;\n"
        "regenerate with\n    /work/refvenv/bin/python tools/make_umt5_fixtures.py\n")
    print("tokenizer:", expected["cases"]["8"]["input_ids"])


if __name__ == "__main__":
    make_encoder("umt5_tiny", UMT5EncoderModel,
                 UMT5Config(**TINY, d_ff=48, feed_forward_proj="gated-gelu"))
    make_encoder("t5_tiny", T5EncoderModel, T5Config(**TINY, d_ff=37, feed_forward_proj="relu"))
    make_tokenizer()
