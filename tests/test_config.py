"""The parameter taxonomy: model yaml, validated user params, frozen system params."""

import dataclasses

import jax.numpy as jnp
import pytest

from sdjax.config import CacheParams, ConfigError, ModelConfig, ModelDefaults, SystemConfig


@pytest.fixture
def model():
    return ModelConfig.named("wan2.1-t2v-1.3b")


def test_defaults_come_from_the_model_yaml(model):
    p = model.user_params(prompt="a cat", seed=1)
    assert (p.num_inference_steps, p.guidance_scale, p.height, p.width, p.num_frames) == (50, 5.0, 480, 832, 81)
    assert p.flow_shift == 3.0 and p.solver == "unipc" and p.cache == CacheParams("none", 0.0)
    assert ModelConfig.named("wan2.1-t2v-14b").user_params(prompt="x", seed=0).height == 720


def test_user_params_are_frozen(model):
    p = model.user_params(prompt="a cat", seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 2


def test_seed_is_drawn_when_absent(model):
    assert isinstance(model.user_params(prompt="a cat").seed, int)


@pytest.mark.parametrize("field, value, allowed", [
    ("num_frames", 80, r"4k\+1"), ("num_frames", 200, "<= 129"), ("height", 481, "multiple of 16"),
    ("width", 2000, "<= 1280"), ("num_inference_steps", 0, ">= 1"), ("num_inference_steps", 101, r"\[1, 100\]"),
    ("guidance_scale", -0.5, ">= 0"), ("guidance_scale", float("nan"), "finite"), ("flow_shift", 0, "> 0"),
    ("solver", "ddim", "unipc, euler"), ("max_sequence_length", 0, ">= 1"), ("negative_prompt", 3, "string"),
])
def test_bad_values_name_field_value_and_allowed(model, field, value, allowed):
    with pytest.raises(ConfigError, match=rf"{field}=.*not allowed.*{allowed}"):
        model.user_params(prompt="a cat", **{field: value})


def test_prompt_and_seed_and_unknown_fields(model):
    with pytest.raises(ConfigError, match="prompt"):
        model.user_params(prompt="   ")
    with pytest.raises(ConfigError, match="seed"):
        model.user_params(prompt="x", seed=-1)
    with pytest.raises(ConfigError, match="unknown user param.*'steps'"):
        model.user_params(prompt="x", steps=3)


def test_cache_param(model):
    p = model.user_params(prompt="x", cache={"policy": "teacache", "threshold": 0.1})
    assert p.cache == CacheParams("teacache", 0.1)
    with pytest.raises(ConfigError, match="cache.policy"):
        model.user_params(prompt="x", cache={"policy": "magic"})
    with pytest.raises(ConfigError, match="cache.threshold"):
        model.user_params(prompt="x", cache={"threshold": -1})
    with pytest.raises(ConfigError, match="unknown cache field"):
        model.user_params(prompt="x", cache={"thresh": 1})


def test_cache_policy_without_threshold_gets_the_models_recommended_one(model):
    assert model.user_params(prompt="x", cache={"policy": "teacache"}).cache == CacheParams("teacache", 0.08)
    assert ModelConfig.named("wan2.1-t2v-14b").user_params(prompt="x", cache={"policy": "teacache"}).cache == \
        CacheParams("teacache", 0.2)
    with pytest.raises(ConfigError, match=r"cache.threshold=None .*cache.policy='fbcache'.*teacache: 0.08"):
        model.user_params(prompt="x", cache={"policy": "fbcache"})  # nothing published for Wan: must be given
    assert model.user_params(prompt="x", cache={"policy": "fbcache", "threshold": 0.05}).cache.threshold == 0.05
    demo = ModelConfig.named("sdjax-demo")  # default static 2.0; a policy alone never inherits that threshold
    assert demo.user_params(prompt="x").cache == CacheParams("static", 2.0)
    assert demo.user_params(prompt="x", cache={"policy": "teacache"}).cache == CacheParams("teacache", 0.08)
    assert demo.user_params(prompt="x", cache={"threshold": 3}).cache == CacheParams("static", 3)
    assert demo.user_params(prompt="x", cache={"policy": "none"}).cache == CacheParams("none", 0.0)


@pytest.mark.parametrize(("thresholds", "field"), [({"magic": 0.1}, "cache.policy"),
                                                    ({"teacache": -1}, "cache.threshold"),
                                                    ({"none": 0.0}, "cache_thresholds")])
def test_model_yaml_cache_thresholds_are_validated(thresholds, field):
    with pytest.raises(ConfigError, match=field):
        ModelDefaults(num_inference_steps=8, guidance_scale=5.0, flow_shift=3.0, height=32, width=48,
                      num_frames=5, fps=8, max_sequence_length=16, cache_thresholds=thresholds)


def test_system_config_validates_and_is_frozen():
    s = SystemConfig(cfg_parallel=2, ulysses=2, ring=2)
    assert s.num_devices == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dtype = "float32"
    for kwargs, field in [({"dtype": "fp8"}, "dtype"), ({"attention_backend": "magic"}, "attention_backend"),
                          ({"cfg_parallel": 3}, "cfg_parallel"), ({"ulysses": 0}, "ulysses"),
                          ({"dtype": "float32", "residual_dtype": "bfloat16"}, "residual_dtype"),
                          ({"residual_dtype": "float16"}, "residual_dtype")]:
        with pytest.raises(ConfigError, match=field):
            SystemConfig(**kwargs)


@pytest.mark.parametrize("system, dtype, stream", [
    ({"dtype": "bfloat16"}, None, "bfloat16"),  # the compute dtype, as diffusers
    ({"dtype": "bfloat16", "residual_dtype": "float32"}, None, "float32"),  # as the original Wan
    ({"dtype": "bfloat16"}, "float32", "float32"),  # a pipeline dtype overriding the system's: all fp32
])
def test_the_residual_stream_dtype_reaches_the_transformer(system, dtype, stream):
    from sdjax.pipeline import Pipeline
    from tests.conftest import FIXTURES

    pipe = Pipeline.from_pretrained(FIXTURES / "wan_pipeline_tiny", dtype=dtype, system=SystemConfig(**system))
    assert pipe.transformer.residual_dtype == jnp.dtype(stream)


def test_unknown_model_lists_the_built_in_ones():
    with pytest.raises(ConfigError, match="wan2.1-t2v-1.3b"):
        ModelConfig.named("wan9")


def test_compile_cache_dir_is_applied_by_entry_points(tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    try:
        SystemConfig(compile_cache_dir=str(tmp_path / "cc")).apply_to_runtime()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
        assert (tmp_path / "cc").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_system_weights_is_the_default_model_directory():
    from sdjax.pipeline import Pipeline
    from tests.conftest import FIXTURES

    pipe = Pipeline.from_pretrained(None, dtype="float32",
                                    system=SystemConfig(weights=str(FIXTURES / "wan_pipeline_tiny")))
    assert pipe.transformer.config.num_layers == 2
    with pytest.raises(ConfigError, match="model directory"):
        Pipeline.from_pretrained(None)
