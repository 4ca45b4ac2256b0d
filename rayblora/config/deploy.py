"""Config sections of where a run goes and how it is served: cluster (Ray resources), output, serve."""

from __future__ import annotations

from dataclasses import dataclass

from rayblora.config.validation import check

MEMBER_RUNNERS = ("separate", "packed", "auto")


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""
    """Ray address to connect to ("" = start a local Ray in-process, "auto" = the running cluster)."""
    num_cpus: int = 0
    """Logical CPUs of the local Ray started when address is "" (0 = Ray's default)."""
    workers_per_member: int = 1
    """Ray Train workers of one member (data parallel / ZeRO inside the member)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each Ray Train worker."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    max_failures: int = 1
    """Ray Train restarts of a member after a worker failure."""
    max_concurrent_members: int = 0
    """Member runs in flight at once; the next starts when one finishes. 0 = as many as the cluster's resources
    hold side by side when training starts (its CPUs, and GPUs with use_gpu, over one member's share), so no run
    waits for a placement; N = N at once whatever the cluster holds now: for a cluster that autoscales, where
    waiting runs make the autoscaler add nodes. (A train sweep's trials have `--max-concurrent` instead.)"""
    storage_path: str = ""
    """RunConfig storage for member checkpoints ("" = <output.dir>/ray_runs)."""
    member_runner: str = "separate"
    """How members train in process (`--in-process`, benchmarks): separate (one loop each, one after another) |
    packed (all in one loop, one batched forward / backward over the shared frozen base; the same members to
    float rounding, :mod:`rayblora.train.packed`) | auto (packed wherever that is exact: plain LoRA training, no
    DeepSpeed, LoRA dropout on the CPU only)."""

    def __post_init__(self) -> None:
        check(self.num_cpus >= 0, "cluster.num_cpus", "must be >= 0")
        check(self.workers_per_member >= 1, "cluster.workers_per_member", "must be >= 1")
        check(self.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
        check(self.max_failures >= -1, "cluster.max_failures", "must be >= -1 (-1 = unlimited)")
        check(self.member_runner in MEMBER_RUNNERS, "cluster.member_runner",
              f"must be one of {list(MEMBER_RUNNERS)}, got {self.member_runner!r}")
        check(self.max_concurrent_members >= 0, "cluster.max_concurrent_members",
              "must be >= 0 (0 = as many as the cluster holds)")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/demo"
    """Run directory: the posterior, reports and Ray run storage go under it."""
    name: str = "rayblora"
    """Run name, used in Ray run names and the manifest."""

    def __post_init__(self) -> None:
        check(bool(self.dir), "output.dir", "must not be empty")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to: loopback unless set otherwise ("0.0.0.0" = every interface)."""
    port: int = 8000
    """HTTP port of the proxy."""
    max_inputs_per_request: int = 32
    """Most inputs one POST /v1/predict may carry (and most prompts of one POST /v1/generate)."""
    max_tokens_per_input: int = 256
    """Most tokens of one formatted prompt (of one raw prompt for POST /v1/generate), counted with the
    posterior's tokenizer (a text longer than 16 characters per allowed token is refused before tokenising)."""
    max_new_tokens: int = 64
    """Most tokens POST /v1/generate may ask for per prompt (its `max_new_tokens`, at most 4096)."""
    max_choices: int = 8
    """Most options of one multiple-choice question (the posterior's task may allow fewer)."""
    max_body_bytes: int = 0
    """Largest request body in bytes; a larger one is answered 413 before it is read (a `Content-Length` over
    the limit at once). 0 = sized from the input limits (:meth:`body_limit`)."""
    drain_bytes: int = 64 * 1024 * 1024
    """After a 413 the rest of the refused body is read and discarded, up to this many bytes, so that a client
    still uploading reads the answer instead of a connection reset; a longer upload is cut off."""
    drain_timeout_s: float = 10.0
    """Longest wait for the next part of a refused body while it is drained (see `drain_bytes`): a slow upload
    that keeps coming is drained to its end (however many uploads share the proxy), a stalled one is cut off."""
    request_timeout_s: float = 300.0
    """Longest a request waits for a replica's answer (a stream: for its first event) before it is answered 503;
    a replica that died (out of memory, a lost node) is answered 503 at once."""
    retry_after_s: float = 5.0
    """The `Retry-After` (seconds) of a 503: about how long Serve takes to restart a replica."""
    abstain_threshold: float = 0.0
    """Default confidence below which an answer is flagged `abstained` (0 = never); a request may override."""
    num_replicas: int = 1
    """Replicas of the endpoint when autoscaling is off."""
    autoscaling_min_replicas: int = 1
    """Fewest replicas when autoscaling is on."""
    autoscaling_max_replicas: int = 0
    """Most replicas; 0 turns autoscaling off (num_replicas fixed replicas)."""
    autoscaling_target_ongoing_requests: float = 8.0
    """Ongoing requests per replica the autoscaler aims for."""
    max_ongoing_requests: int = 32
    """Requests one replica works on at once (they share its dynamic batches)."""
    max_queued_requests: int = 64
    """Requests waiting for a free replica slot; beyond that the endpoint answers 503 at once."""
    batch_max_size: int = 32
    """Most inputs, summed over the batched requests, in one forward pass (>= max_inputs_per_request)."""
    batch_wait_timeout_s: float = 0.01
    """How long a batch waits for more requests after its first one."""
    max_posteriors_per_replica: int = 3
    """Posteriors held in memory by one replica; the least recently used is unloaded beyond that."""
    replica_cpus: float = 1.0
    """Ray CPUs reserved by each replica."""
    torch_threads: int = 0
    """torch intra-op threads of a replica (0 = leave torch's default)."""
    auth_token_env: str = "RAYBLORA_API_TOKEN"
    """Environment variable holding the bearer token when `auth_token` is empty ("" = none)."""
    auth_token: str = ""
    """Bearer token required on every route but /healthz ("" = the variable above; unset there = no auth)."""

    def body_limit(self) -> int:
        """`max_body_bytes`, or room for `max_inputs_per_request` texts of the longest accepted length (16
        characters per allowed token, 4 bytes per character in UTF-8 or escaped JSON) plus 64 KiB."""
        if self.max_body_bytes:
            return self.max_body_bytes
        return self.max_inputs_per_request * self.max_tokens_per_input * 16 * 4 + 64 * 1024

    def __post_init__(self) -> None:
        check(bool(self.host.strip()), "serve.host", "must not be empty")
        check(1 <= self.port <= 65535, "serve.port", f"must be in [1, 65535], got {self.port}")
        for name in ("max_inputs_per_request", "max_tokens_per_input", "num_replicas", "max_ongoing_requests",
                     "max_queued_requests", "max_posteriors_per_replica"):
            check(getattr(self, name) >= 1, f"serve.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(2 <= self.max_choices <= 26, "serve.max_choices", f"must be in [2, 26], got {self.max_choices}")
        check(0.0 <= self.abstain_threshold <= 1.0, "serve.abstain_threshold", "must be in [0, 1]")
        check(self.autoscaling_max_replicas == 0 or
               1 <= self.autoscaling_min_replicas <= self.autoscaling_max_replicas,
               "serve.autoscaling_min_replicas/max_replicas", "need 1 <= min <= max (or max = 0: no autoscaling)")
        check(self.autoscaling_target_ongoing_requests > 0, "serve.autoscaling_target_ongoing_requests",
               "must be > 0")
        check(self.batch_max_size >= self.max_inputs_per_request, "serve.batch_max_size",
               f"must be >= serve.max_inputs_per_request ({self.max_inputs_per_request}), "
               f"got {self.batch_max_size}")
        check(self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", "must be >= 0")
        check(self.replica_cpus > 0, "serve.replica_cpus", "must be > 0")
        check(self.torch_threads >= 0, "serve.torch_threads", "must be >= 0")
        check(1 <= self.max_new_tokens <= 4096, "serve.max_new_tokens",
              f"must be in [1, 4096], got {self.max_new_tokens}")
        check(self.max_body_bytes >= 0, "serve.max_body_bytes", f"must be >= 0, got {self.max_body_bytes}")
        check(self.drain_bytes >= 0, "serve.drain_bytes", f"must be >= 0, got {self.drain_bytes}")
        check(self.drain_timeout_s >= 0, "serve.drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s}")
        check(self.request_timeout_s > 0, "serve.request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
        check(self.retry_after_s >= 0, "serve.retry_after_s", f"must be >= 0, got {self.retry_after_s}")

