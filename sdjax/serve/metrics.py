"""Prometheus metrics of one process (its own registry, so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# A video job takes seconds to tens of minutes: explicit buckets up to 30 min (the client default stops at 10 s).
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900, 1200, 1800)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("sdjax_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running = Gauge("sdjax_jobs_running", "Jobs this worker holds", registry=r)
        self.ready = Gauge("sdjax_ready", "1 when this process is ready (warmed up, not draining)", registry=r)
        self.submitted = Counter("sdjax_jobs_submitted", "Jobs accepted", ["kind"], registry=r)
        self.rejected = Counter("sdjax_requests_rejected", "Requests refused", ["reason"], registry=r)
        self.finished = Counter("sdjax_jobs_finished", "Jobs ended by this worker", ["kind", "status"], registry=r)
        self.failures = Counter("sdjax_job_failures", "Failed jobs by reason", ["reason"], registry=r)
        self.latency = Histogram("sdjax_job_latency_seconds", "Created to finished", ["kind"],
                                 buckets=JOB_BUCKETS, registry=r)
        self.queue_wait = Histogram("sdjax_queue_wait_seconds", "Created to leased", buckets=JOB_BUCKETS,
                                    registry=r)
        self.stage = Histogram("sdjax_stage_seconds", "Time per stage", ["stage"], buckets=JOB_BUCKETS, registry=r)
        self.step = Histogram("sdjax_step_seconds", "Time per denoising step", buckets=STEP_BUCKETS, registry=r)
        self.cache_skip = Histogram("sdjax_cache_skip_ratio", "Fraction of transformer evaluations skipped by "
                                    "the feature cache, per job", buckets=RATIO_BUCKETS, registry=r)
        self.requeued = Counter("sdjax_jobs_requeued", "Jobs whose lease expired and went back to the queue",
                                registry=r)
        self.reloads = Counter("sdjax_reloads", "Model reloads", ["result"], registry=r)
        self.warmup = Gauge("sdjax_warmup_seconds", "Duration of the last warm-up (all shapes)", registry=r)
        self.model = Info("sdjax_model", "Model served by this worker", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
