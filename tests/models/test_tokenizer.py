"""Wan prompt handling against transformers' T5TokenizerFast + diffusers' prompt_clean
(fixture from tools/make_umt5_fixtures.py)."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.tokenizer import (
    TokenizerError,
    encode_prompts,
    load_tokenizer,
    prompt_clean,
    wan_text_context,
)
from sdjax.models.weights import WeightsError
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "tokenizer_tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def encode_quietly(tokenizer, prompts, max_length):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode_prompts(tokenizer, prompts, max_length)


def test_prompt_clean_matches_diffusers():
    assert [prompt_clean(p) for p in EXPECTED["prompts"]] == EXPECTED["cleaned"]


@pytest.mark.parametrize("max_length", [8, 16])
def test_ids_and_mask_match_transformers(max_length):
    case = EXPECTED["cases"][str(max_length)]
    tokenizer = load_tokenizer(FIXTURE / "tokenizer.json")
    ids, mask = encode_quietly(tokenizer, [prompt_clean(p) for p in EXPECTED["prompts"]], max_length)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(EXPECTED["prompts"]), max_length)
    np.testing.assert_array_equal(ids, np.array(case["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(case["attention_mask"]))


def test_eos_once_whatever_the_file_post_processor(tmp_path):
    # transformers' T5 tokenizer always uses the template `$A </s>`; a file without a post-processor gives the
    # same ids, and one that appends </s> itself does not get a second one.
    data = json.loads((FIXTURE / "tokenizer.json").read_text())
    assert data["post_processor"]["type"] == "TemplateProcessing"
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    prompts = EXPECTED["cleaned"]
    a = encode_quietly(load_tokenizer(tmp_path), prompts, 16)
    b = encode_quietly(load_tokenizer(FIXTURE), prompts, 16)
    np.testing.assert_array_equal(a[0], b[0])
    assert b[0][0].tolist()[:8] == [7, 5, 10, 8, 7, 11, 1, 0]  # "the cat sat on the mat" </s> <pad>


def test_truncation_warns_with_counts():
    tokenizer = load_tokenizer(FIXTURE)
    lengths = EXPECTED["cases"]["8"]["untruncated_lengths"]  # transformers' token counts, EOS included
    long_prompt = EXPECTED["cleaned"][3]
    with pytest.warns(UserWarning, match=rf"{lengths[3]} tokens.*max_sequence_length=8"):
        ids, mask = encode_prompts(tokenizer, [long_prompt], 8)
    assert ids[0, -1] == 1 and mask.sum() == 8  # cut to 7 tokens + </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fits: no warning
        encode_prompts(tokenizer, [long_prompt], lengths[3])


def test_empty_prompt_is_a_single_eos():
    ids, mask = encode_prompts(load_tokenizer(FIXTURE), [""], 4)
    assert ids.tolist() == [[1, 0, 0, 0]] and mask.tolist() == [[1, 0, 0, 0]]


def test_bad_arguments():
    tokenizer = load_tokenizer(FIXTURE)
    with pytest.raises(TypeError, match="list of strings"):
        encode_prompts(tokenizer, "a cat", 8)
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_prompts(tokenizer, ["a cat"], 0)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_tokenizer(tmp_path / "tokenizer.json")
    data = json.loads((FIXTURE / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    data["model"]["vocab"] = [v for v in data["model"]["vocab"] if v[0] != "</s>"]
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="'</s>'"):
        load_tokenizer(tmp_path)


def test_wan_text_context_zeroes_rows_past_the_real_length():
    hidden = jax.random.normal(jax.random.key(0), (3, 6, 5), jnp.bfloat16)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    out = jax.jit(wan_text_context)(hidden, mask)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    for b, n in enumerate([3, 1, 6]):
        np.testing.assert_array_equal(np.asarray(out[b, :n], np.float32), np.asarray(hidden[b, :n], np.float32))
        assert not np.any(np.asarray(out[b, n:], np.float32))
    # diffusers keeps the first mask.sum() rows, whatever the mask pattern.
    out = wan_text_context(hidden[:1], jnp.array([[0, 1, 1, 0, 0, 0]]))
    np.testing.assert_array_equal(np.asarray(out[0, :2], np.float32), np.asarray(hidden[0, :2], np.float32))
    assert not np.any(np.asarray(out[0, 2:], np.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        wan_text_context(hidden, mask[:, :4])
