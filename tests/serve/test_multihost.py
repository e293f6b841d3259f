"""Multi-host serving on one process: the leader's engine mirrors every call through the broadcast path, and a
follower that executes the same calls in the same order ends in the same state (tests what one process can)."""

import numpy as np
import pytest

from sdjax.config import ModelConfig
from sdjax.serve.multihost import Executor, Handle, leader_factory
from sdjax.serve.settings import parse_settings
from tests.serve import fake_engine


@pytest.fixture
def settings(tmp_path):
    return parse_settings(["--data-dir", str(tmp_path)])


def params(engine, **kw):
    return engine.user_params(prompt="a red circle moves left", seed=3, num_inference_steps=6, **kw)


def test_leader_engine_gives_the_plain_engine_result(settings):
    plain = fake_engine.make(settings)
    engine = leader_factory(fake_engine.make)(settings)
    assert engine.config.name == plain.config.name
    p = params(plain)
    steps, stats = [], {}
    text = engine.encode_text(p)
    assert isinstance(text, Handle)
    latents = engine.denoise(p, text, on_step=lambda i, n: steps.append(i), stats=stats)
    frames = engine.decode(latents)
    want = plain.decode(plain.denoise(p, plain.encode_text(p)))
    np.testing.assert_array_equal(frames, want)
    assert steps == list(range(1, 7)) and stats["steps_computed"] == 6
    pixels = engine.decode(engine.denoise(p, engine.encode_text(p)), "uint8")  # the service's frames
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, plain.decode(plain.denoise(p, plain.encode_text(p)), "uint8"))


def test_cancel_is_decided_by_the_leader(settings):
    engine = leader_factory(fake_engine.make)(settings)
    p = params(engine)
    text = engine.encode_text(p)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(fake_engine.Cancelled):
        engine.denoise(p, text, should_stop=stop)
    # the next job still runs on the same engine
    assert engine.decode(engine.denoise(p, engine.encode_text(p))).shape[0] == p.num_frames


def test_a_follower_replaying_the_calls_reaches_the_same_frames(settings):
    recorded = []
    leader = Executor(fake_engine.make, settings, leader=True)
    follower = Executor(fake_engine.make, settings, leader=False)

    def both(request):
        recorded.append(request)
        follower.run(request)
        return leader.run(request)

    both(("build", 0, None))
    p = params(leader.engines[0])
    text = both(("encode", 0, 1, p))
    latents = both(("denoise", 0, text.key, p))
    frames = both(("decode", 0, latents.key, "uint8"))  # the service's frames
    assert [r[0] for r in recorded] == ["build", "encode", "denoise", "decode"]
    assert not leader.results and not follower.results  # nothing left behind
    for engine_id in (1, 2):  # reloads keep the newest two engines
        both(("build", engine_id, None))
    assert sorted(follower.engines) == [1, 2]
    assert frames.shape == (p.num_frames, p.height, p.width, 3) and frames.dtype == np.uint8


def test_model_config_reaches_the_service(settings):
    engine = leader_factory(fake_engine.make)(settings)
    assert isinstance(engine.config, ModelConfig)
    assert engine.user_params(prompt="x", seed=1).seed == 1
