"""The service over the real `sdjax.pipeline.Pipeline` (the tiny random Wan pipeline fixture, CPU)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from tests.serve.conftest import FIXTURES, create_video, wait_status


@pytest.mark.slow
def test_real_pipeline_video_and_image(spawn):
    # no --engine: the default factory, Pipeline.from_pretrained(--model); one allowed shape keeps warm-up short
    s = spawn("--model", str(FIXTURES / "wan_pipeline_tiny"), "--dtype", "float32", "--sizes", "32x32",
              "--frames", "5", engine="", ready_timeout=240, name="real")
    with s.client(timeout=60) as c:
        model = c.get("/v1/models").json()["data"][0]
        assert model["sizes"] == ["32x32"] and model["frames"] == [5]
        job = create_video(c, prompt="a cat", seed=3, num_inference_steps=2)
        done = wait_status(c, job["id"], timeout=120)
        assert done["status"] == "completed", done
        assert done["steps_done"] == 2 and done["num_frames"] == 5 and done["size"] == "32x32"
        content = c.get(f"/v1/videos/{job['id']}/content").content
        assert content[4:8] == b"ftyp" and hashlib.sha256(content).hexdigest() == done["result"]["sha256"]
        r = c.post("/v1/images/generations", json={"prompt": "a dog", "seed": 1, "num_inference_steps": 2})
        assert r.status_code == 200, r.text
        assert base64.b64decode(r.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
