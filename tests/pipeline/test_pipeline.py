"""End-to-end parity with diffusers' WanPipeline (fixture: tools/make_pipeline_fixture.py)."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from sdjax.config import ConfigError
from sdjax.models.weights import WeightsError
from sdjax.pipeline import Pipeline
from tests.conftest import FIXTURES

ROOT = FIXTURES / "wan_pipeline_tiny"
CASES = [  # the same cases as tools/make_pipeline_fixture.py
    ("a red circle moves left", "blurry, static", 4, 5.0, 3.0),
    ("the   quick brown fox jumps over the lazy dog on a sunny day", "", 3, 4.0, 5.0),
]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(ROOT, dtype="float32")


@pytest.mark.parametrize("k", range(len(CASES)))
def test_frames_match_diffusers(pipe, k):
    io = np.load(FIXTURES / "wan_pipeline_tiny_io.npz")
    prompt, negative, steps, guidance, shift = CASES[k]
    result = pipe(prompt, negative_prompt=negative, height=int(io["height"]), width=int(io["width"]),
                  num_frames=int(io["num_frames"]), num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=int(io["max_sequence_length"]), flow_shift=shift, seed=0,
                  latents=io[f"latents_{k}"], progress=False)
    ref = io[f"frames_{k}"]
    assert result.frames.shape == ref.shape
    assert result.frames.dtype == np.float32
    assert np.abs(result.frames - ref).max() <= 2e-3
    assert set(result.info["timings"]) == {"text_encode_s", "denoise_s", "decode_s"}


def test_seed_is_reported_and_reproducible(pipe):
    a = pipe("a cat", height=16, width=16, num_frames=5, num_inference_steps=2, progress=False)
    b = pipe("a cat", height=16, width=16, num_frames=5, num_inference_steps=2, seed=a.info["seed"], progress=False)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.shape == (5, 16, 16, 3)


def test_uint8_frames_are_the_float_frames_rounded_on_the_device(pipe):
    """output_type="uint8" (what the CLI and the service write) rounds on the device as `media.to_uint8` does on
    the host: the same pixels but for the odd value on a rounding boundary (fused multiply-add)."""
    from sdjax import media

    kw = dict(height=16, width=32, num_frames=5, num_inference_steps=2, seed=7, progress=False)
    floats = pipe("a cat", **kw).frames
    pixels = pipe("a cat", output_type="uint8", **kw).frames
    assert pixels.dtype == np.uint8 and pixels.shape == floats.shape
    diff = np.abs(pixels.astype(np.int16) - media.to_uint8(floats))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999
    with pytest.raises(ConfigError, match="output_type='pil' is not allowed; allowed: np, uint8"):
        pipe("a cat", output_type="pil", **kw)


@pytest.mark.parametrize("field, value, allowed", [
    ("num_frames", 10, "4k\\+1"), ("height", 40, "multiple of 16"), ("width", 24, "multiple of 16"),
    ("num_inference_steps", 0, ">= 1"), ("guidance_scale", -1.0, ">= 0"),
])
def test_bad_user_params_name_the_field(pipe, field, value, allowed):
    with pytest.raises(ConfigError, match=f"{field}.*{allowed}"):
        pipe("a cat", **{field: value}, progress=False)


def test_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="max_sequence_length"):
        pipe("word " * 50, height=16, width=16, num_frames=1, num_inference_steps=1, max_sequence_length=8,
             progress=False)


@pytest.mark.parametrize("component", ["vae", "text_encoder", "transformer", "tokenizer"])
def test_missing_component_is_named(tmp_path, component):
    root = tmp_path / "root"
    shutil.copytree(ROOT, root)
    shutil.rmtree(root / component)
    with pytest.raises(WeightsError, match=component):
        Pipeline.from_pretrained(root, dtype="float32")


def test_missing_model_index(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(ROOT, root)
    (root / "model_index.json").unlink()
    with pytest.raises(WeightsError, match="model_index.json"):
        Pipeline.from_pretrained(root)


def test_cli_writes_mp4_with_metadata(tmp_path):
    out = tmp_path / "v.mp4"
    proc = subprocess.run([sys.executable, "-m", "sdjax.generate", "--model", str(ROOT), "--prompt", "a red circle",
                           "--steps", "2", "--height", "32", "--width", "32", "--frames", "5", "--seed", "3",
                           "--dtype", "float32", "--cache", "teacache", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "denoise" in proc.stderr  # the progress bar
    assert "steps computed" in proc.stdout
    assert "wrote" in proc.stdout and "decode" in proc.stdout
    from sdjax.media import read_video

    video = read_video(out)
    assert video.shape == (5, 32, 32, 3)
    import imageio_ffmpeg

    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True).stderr
    assert "h264" in probe and "yuv420p" in probe and "16 fps" in probe
    from sdjax.media import read_metadata

    meta = read_metadata(out)
    assert meta["seed"] == 3 and meta["num_inference_steps"] == 2 and meta["prompt"] == "a red circle"
    assert meta["cache"] == {"policy": "teacache", "threshold": 0.08}  # the model's recommended threshold


def test_cli_png_for_one_frame_and_clear_errors(tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "sdjax.generate", "--model", str(ROOT), "--prompt", "a cat",
                           "--steps", "1", "--height", "16", "--width", "16", "--frames", "1", "--dtype", "float32",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    img = Image.open(out)
    assert img.size == (16, 16)
    from sdjax.media import read_metadata

    assert read_metadata(out)["num_frames"] == 1
    bad = subprocess.run([sys.executable, "-m", "sdjax.generate", "--model", str(ROOT), "--prompt", "a cat",
                          "--frames", "6"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "num_frames" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "sdjax.generate", "--model", str(ROOT), "--prompt", "a cat",
                          "--cache-threshold", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cache.threshold" in bad.stderr and "Traceback" not in bad.stderr


def test_steps_shift_and_guidance_change_without_recompiling(pipe):
    from sdjax.sampling import loop

    kw = dict(height=16, width=16, num_frames=5, progress=False, seed=1)
    pipe("a cat", num_inference_steps=2, guidance_scale=3.0, flow_shift=3.0, **kw)
    compiled = loop.denoise_step._cache_size()
    pipe("a cat", num_inference_steps=5, guidance_scale=7.5, flow_shift=8.0, **kw)
    pipe("a dog", num_inference_steps=3, guidance_scale=2.0, flow_shift=1.0, **kw)
    assert loop.denoise_step._cache_size() == compiled


def test_components_that_do_not_belong_together_are_refused(pipe):
    """Mixed checkpoints fail by name: a latent width the VAE does not have, a text width the encoder does not make,
    and a tokenizer larger than the encoder's embedding table (its ids would become NaN embeddings, silently)."""
    demo = Pipeline.default()  # z_dim 16, d_model 64, 32 tokens; the fixture: 8, 32, its tokenizer more than 32
    with pytest.raises(WeightsError, match="in_channels=8, out_channels=8, but the vae has z_dim=16"):
        Pipeline(pipe.config, pipe.transformer, demo.vae, pipe.text_encoder, pipe.tokenizer)
    with pytest.raises(WeightsError, match="text_dim=32, but the text encoder has d_model=64"):
        Pipeline(pipe.config, pipe.transformer, pipe.vae, demo.text_encoder, pipe.tokenizer)
    with pytest.raises(WeightsError, match=r"tokenizer: \d+ tokens, but the text encoder embeds only vocab_size=32"):
        Pipeline(demo.config, demo.transformer, demo.vae, demo.text_encoder, pipe.tokenizer)


def test_warmup_compiles_every_solver_and_cache_policy(pipe):
    """After `warmup` (what the service runs at start-up) no per-request choice compiles a new step."""
    from sdjax.sampling import loop

    kw = dict(height=32, width=16, num_frames=5, seed=2)  # a shape no other test uses
    pipe.warmup(pipe.user_params(prompt="warm-up", **kw))
    compiled = loop.denoise_step._cache_size()
    for solver in ("unipc", "euler"):
        for cache in ({"policy": "teacache", "threshold": 0.1}, {"policy": "fbcache", "threshold": 0.05},
                      {"policy": "static", "threshold": 2}, {"policy": "none"}):
            pipe("a cat", num_inference_steps=3, solver=solver, cache=cache, progress=False, **kw)
    assert loop.denoise_step._cache_size() == compiled


def test_warmup_compiles_the_other_variants_side_by_side_before_their_runs(pipe, monkeypatch):
    """All step variants but the first (per text form) compile ahead of their runs, in worker threads; the runs
    that follow find them compiled: no XLA compile happens between the first of those runs and the decode."""
    import threading
    import time

    import jax

    from sdjax.config import CACHE_POLICIES, SOLVERS

    threads, denoise_starts, compiles = [], [], []
    compile_step, denoise = pipe._compile_step, pipe.denoise
    monkeypatch.setattr(pipe, "_compile_step", lambda *a: (threads.append(threading.current_thread()),
                                                           compile_step(*a))[1])
    monkeypatch.setattr(pipe, "denoise", lambda *a, **k: (denoise_starts.append(time.perf_counter()),
                                                          denoise(*a, **k))[1])
    monkeypatch.setattr(pipe, "decode", lambda z, *_: denoise_starts.append(time.perf_counter()))  # marks the end

    def on_duration(name, _secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(time.perf_counter())

    params = pipe.user_params(prompt="warm-up", height=16, width=32, num_frames=9, seed=3)  # a shape no other
    forms = 2 if pipe._folds_text_of_length(params.max_sequence_length) else 1  # test uses: nothing compiled yet
    variants = len(SOLVERS) * len(CACHE_POLICIES) * forms
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    start = time.perf_counter()
    try:
        phases = pipe.warmup(params)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    wall = time.perf_counter() - start
    assert len(threads) == variants - forms and threading.main_thread() not in threads
    # where the time went: the phases fit in the call, and the summed compiles in the pool's wall clock × workers
    assert phases["variants"] == variants and phases["workers"] >= 1
    assert phases["leads_s"] + phases["side_by_side_s"] + phases["runs_s"] <= wall
    assert 0 < phases["side_by_side_compile_s"] <= phases["side_by_side_s"] * phases["workers"]
    assert len(denoise_starts) == variants + 1
    first_run_after_pool, end = denoise_starts[forms], denoise_starts[-1]
    assert not [t for t in compiles if first_run_after_pool <= t <= end]


@pytest.mark.parametrize("prompt, folded_form", [("cat", "FoldedText"), ("a red circle moves left", "ArrayImpl")],
                         ids=["short_prompt_folded", "long_prompt_whole"])
def test_folded_text_padding_gives_the_same_frames(pipe, prompt, folded_form, monkeypatch):
    """Prompts shorter than TEXT_FOLD_ROWS tokens run the cross-attention on their folded padding (here: 8 of 16
    rows); longer ones on the whole context. Either way the frames are the unfolded ones (fp32)."""
    import sdjax.pipeline as pipeline_module

    kw = dict(negative_prompt="", height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0,
              max_sequence_length=16, seed=0, progress=False)
    forms = []
    fold = pipe._fold_text_padding
    monkeypatch.setattr(pipe, "_fold_text_padding", lambda c, u: forms.append(fold(c, u)) or forms[-1])
    monkeypatch.setattr(pipeline_module, "TEXT_FOLD_ROWS", 8)
    folded = pipe(prompt, **kw).frames
    monkeypatch.setattr(pipeline_module, "TEXT_FOLD_ROWS", 0)
    whole = pipe(prompt, **kw).frames
    assert [type(c).__name__ for c in forms[0]] == [folded_form] * 2
    assert [type(c).__name__ for c in forms[1]] == ["ArrayImpl"] * 2
    assert np.abs(folded - whole).max() <= 1e-5
