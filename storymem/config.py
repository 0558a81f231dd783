"""Typed configuration, one pydantic model per concern.

Every field is documented where it is declared; `storymem config --show` (and the OpenAPI schema of
the service) print these descriptions. Values come from a YAML/JSON file (`load_config`) and from
environment variables prefixed `STORYMEM_` for the few settings that deployments set per machine
(credentials, endpoints, tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .parallel import ParallelConfig
from .speed import SpeedConfig


# The quality bar with real aesthetic weights: the lowest cut LAION published for its LAION-Aesthetics
# V2 subsets (4.5+). The authors filter with HPSv3 >= 3.0 on another scale; both only drop clearly poor
# frames (blur, black, broken ones): the paper's videos average ~6.1 here (aesthetic quality 0.6133 x 10).
LAION_AESTHETIC_THRESHOLD = 4.5
# The embedded scorer trained on the synthetic world (storymem.training.scorer_recipe) scores a frame 10
# where toyworld's detector finds the character and 0 where it finds none. The bank's cut sits near the
# top, not half-way: a frame that only just shows a faint character is remembered as faint, and the
# shots made from it lose the character (docs/identity.md: 5 -> 9 kept the character in 85-88% of
# generated shots instead of 78-85%; 10 skipped too many rendered frames). 7.5, not 9: some rendered
# characters score 7.8-7.9 on every frame, and at 9 their story starts with an empty bank (7.5 took the
# rendered proof from 0.112 / 0.139 to 0.105 / 0.116; faint generated frames score 2-3).
EMBEDDED_QUALITY_THRESHOLD = 7.5
EMBEDDED_SCORER = Path(__file__).resolve().parent / "assets" / "tiny_scorer.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Where the diffusion models come from and how they sit on the device."""

    t2v_path: Path | None = Field(
        None,
        description="Local diffusers folder of the text-to-video model used for shot 1 "
        "(for example Wan2.2-T2V-A14B-Diffusers). None with i2v_path None: the embedded tiny models.",
    )
    i2v_path: Path | None = Field(
        None,
        description="Local diffusers folder of the image-to-video model that M2V adapts "
        "(Wan2.2-I2V-A14B-Diffusers: 36 input channels, transformer + transformer_2).",
    )
    lora_release: Path | None = Field(
        None,
        description="Folder of the released M2V LoRA sets (a snapshot of Hugging Face Kevin-thu/StoryMem): "
        "Wan2.2-MI2V-A14B/ and/or Wan2.2-MM2V-A14B/, each with backbone_high_noise and backbone_low_noise "
        "(.safetensors or .pth). Each set is loaded as a named peft adapter on both experts (m2v_mi2v, m2v_mm2v) "
        "and every shot uses the set of its story's transition (mi2v stories the MI2V set, mm2v the MM2V set, "
        "'none' the MI2V set when both are loaded); a story whose transition no loaded set serves is refused. "
        "Exclusive with lora_high_noise/lora_low_noise.",
    )
    lora_release_sets: list[Literal["mi2v", "mm2v"]] | None = Field(
        None,
        min_length=1,
        description="Which sets of lora_release to load. None: every set folder found (at least one). One set "
        "is fused into the experts (no LoRA cost per step); two stay unfused adapters switched per shot "
        "(each set adds its LoRA weights to GPU memory, ~1.1 GiB per A14B expert in bf16 at rank 128, and "
        "a low-rank matmul per targeted linear layer).",
    )
    lora_high_noise: Path | None = Field(
        None,
        description="A single LoRA of your own for the high-noise expert (e.g. `storymem train` output, or "
        "one released backbone_high_noise file); serves the transitions in lora_transitions. For the release "
        "use lora_release instead.",
    )
    lora_low_noise: Path | None = Field(
        None,
        description="The single LoRA for the low-noise expert (see lora_high_noise). For a single-transformer "
        "checkpoint only this one is used (lora_high_noise when it is the only one given).",
    )
    lora_transitions: list[Literal["none", "mi2v", "mm2v"]] = Field(
        ["none", "mi2v", "mm2v"],
        min_length=1,
        description="Transitions the single LoRA (lora_high_noise/lora_low_noise) was trained for; stories "
        "with another transition are refused. Set ['none', 'mi2v'] for a released MI2V file, ['none', 'mm2v'] "
        "for an MM2V one.",
    )
    embedded_weights: Literal["random"] | Path | None = Field(
        None,
        description="Weights file for the embedded tiny models (a .safetensors bundle). None: the bundle "
        "shipped in storymem/assets when present, else seeded random initialisation; 'random': seeded "
        "random initialisation even when a bundle is shipped (tests of the mechanics, training from scratch).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Compute dtype on GPU. On CPU float32 is always used."
    )
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:N'.")
    offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="'none': everything resident (Wan2.2 A14B: 75.3 GiB peak at 832x480x81, M=10, fits an "
        "80 GB card); 'model': only the running component on the GPU (32.5 GiB peak, ~15% slower per shot: each "
        "expert switch moves 26.7 GiB); 'sequential': layer-by-layer offload, slowest, smallest footprint. docs/gpu.md.",
    )
    boundary: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Expert switch: timesteps >= boundary * 1000 use the high-noise transformer.",
    )
    t2v_boundary: float = Field(
        0.875,
        ge=0.0,
        le=1.0,
        description="Expert switch of the text-to-video pair (shot 1): timesteps >= t2v_boundary * 1000 use its "
        "high-noise transformer. Default: the t2v folder's boundary_ratio (Wan2.2-T2V-A14B: 0.875) unless set here.",
    )
    rope_shift: int = Field(
        5, ge=1, le=64, description="S: memory frame i of M gets temporal RoPE position -(M - i) * S."
    )
    compile: bool = Field(
        False, description="torch.compile the repeated transformer blocks (GPU only). Older spelling of speed.compile."
    )

    @model_validator(mode="after")
    def _one_lora_source(self) -> "ModelConfig":
        if self.lora_release is not None and (self.lora_high_noise is not None or self.lora_low_noise is not None):
            raise ValueError(
                "lora_release: give either the release folder or lora_high_noise/lora_low_noise, not both"
            )
        if self.lora_release_sets is not None and self.lora_release is None:
            raise ValueError("lora_release_sets: needs lora_release (the folder the sets are in)")
        return self

    @property
    def embedded(self) -> bool:
        return self.t2v_path is None and self.i2v_path is None


class MemoryConfig(_Strict):
    """Keyframe selection (method.md, 'Keyframe selection'). Bank capacity and the sink size are per
    story and live in `storymem.script.GenerationSettings` (max_memory_size, fix)."""

    max_keyframes_per_shot: int = Field(3, ge=1, le=16, description="At most this many keyframes a shot.")
    threshold_start: float = Field(
        0.9, gt=0.0, le=1.0, description="Initial CLIP cosine threshold between consecutive keyframes."
    )
    threshold_step: float = Field(
        0.01, gt=0.0, le=0.5, description="Threshold decrement while a shot yields too many keyframes."
    )
    dedupe_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="Skip a keyframe whose similarity to a memory frame is above this."
    )
    quality_threshold: float | Literal["auto"] | None = Field(
        "auto",
        description="Aesthetic score a keyframe must reach; a shot where no frame reaches it adds no keyframe. "
        f"'auto': {LAION_AESTHETIC_THRESHOLD} (LAION aesthetic predictor scale, about 1..10) when "
        f"scoring.aesthetic_weights is configured; {EMBEDDED_QUALITY_THRESHOLD} with the trained embedded scorer "
        "(its head scores toy-world character visibility, 0 or 10); no filter with the seeded one (its scores mean "
        "nothing). StoryMemConfig resolves it, a MemoryConfig used alone filters nothing. None: no filter.",
    )

    def resolved(self, scoring: "ScoringConfig") -> "MemoryConfig":
        """A copy with 'auto' replaced by the threshold that fits this scorer."""
        if self.quality_threshold != "auto":
            return self
        if scoring.aesthetic_weights is not None:
            value = LAION_AESTHETIC_THRESHOLD
        elif scoring.uses_trained_embedded:
            value = EMBEDDED_QUALITY_THRESHOLD
        else:
            value = None
        return self.model_copy(update={"quality_threshold": value})


class ScoringConfig(_Strict):
    """CLIP embeddings and aesthetic scores used for keyframe selection and evaluation."""

    clip_model: str = Field("ViT-B-32", description="open_clip architecture name, or 'tiny' for the embedded one.")
    clip_weights: Path | None = Field(
        None, description="Local open_clip checkpoint for clip_model. None: the embedded tiny CLIP (see embedded_scorer)."
    )
    embedded_scorer: Literal["trained", "seeded"] = Field(
        "trained",
        description="Weights of the embedded tiny CLIP image tower and aesthetic head when clip_weights is unset: "
        "'trained' (storymem/assets/tiny_scorer.safetensors, trained on the synthetic world by "
        "scripts/train_embedded.py: characters apart, a head that scores whether a character is visible; the "
        "seeded weights when the file is absent), 'seeded' (fixed random weights: every frame alike).",
    )
    aesthetic_weights: Path | None = Field(
        None, description="Local LAION-style aesthetic MLP state dict on CLIP image embeddings."
    )
    image_resize: Literal["squash", "crop"] = Field(
        "squash",
        description="How a frame becomes CLIP's square input: 'squash' (the whole frame resized to it, no crop: "
        "the authors' keyframe selection) or 'crop' (shortest side resized, centre crop: open_clip's and "
        "VBench's transform, used by `storymem eval`).",
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Frames per CLIP forward.")
    device: str = Field("cpu", description="Device for the scorer models.")

    @property
    def uses_trained_embedded(self) -> bool:
        """The tiny CLIP and head come from the trained embedded scorer file."""
        return (
            self.clip_weights is None and self.aesthetic_weights is None
            and self.embedded_scorer == "trained" and EMBEDDED_SCORER.is_file()
        )


_S3_KEY_ENV = (("access_key", "STORYMEM_S3_ACCESS_KEY"), ("secret_key", "STORYMEM_S3_SECRET_KEY"))


class StorageConfig(_Strict):
    """S3-compatible object storage (MinIO in production)."""

    endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 API.")
    bucket: str = Field("storymem", min_length=3, max_length=63, description="Bucket holding every story.")
    access_key: SecretStr = Field(SecretStr(""), description="Access key; env STORYMEM_S3_ACCESS_KEY.")
    secret_key: SecretStr = Field(SecretStr(""), description="Secret key; env STORYMEM_S3_SECRET_KEY.")
    secure: bool = Field(False, description="Use HTTPS.")
    region: str | None = Field(None, description="Region name, when the server needs one.")
    retries: int = Field(6, ge=0, le=100, description="Retries of a failing S3 call after its first attempt.")
    backoff_s: float = Field(0.5, gt=0, le=60, description="First retry delay; doubles up to backoff_max_s.")
    backoff_max_s: float = Field(8.0, gt=0, le=600, description="Longest delay between retries.")
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="Lifetime of presigned URLs.")
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="TCP connect timeout of one S3 request.")
    read_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Socket read timeout of one S3 request (a stalled transfer retries)."
    )

    credentials_from_env: bool = Field(
        False,
        description="Set by without_credentials, not by hand: the keys are not in this object, and each process "
        "that opens the store reads STORYMEM_S3_ACCESS_KEY / STORYMEM_S3_SECRET_KEY from its own environment.",
    )

    def without_credentials(self) -> "StorageConfig":
        """The copy that may cross a process boundary. Ray keeps actor and deployment arguments in its
        GCS (in Redis with fault tolerance) and the dashboard shows them, so the keys stay out; each
        actor reads them from its environment (Kubernetes: a Secret on every Ray pod; a local Ray: the
        driver's environment when Ray started, see export_credentials)."""
        if self.credentials_from_env or not (self.access_key.get_secret_value() or self.secret_key.get_secret_value()):
            return self
        return self.model_copy(update={"access_key": SecretStr(""), "secret_key": SecretStr(""), "credentials_from_env": True})

    def with_credentials(self) -> "StorageConfig":
        """Keys back from this process's environment when without_credentials removed them."""
        if not self.credentials_from_env:
            return self
        values = {}
        for name, var in _S3_KEY_ENV:
            value = os.environ.get(var)
            if not value:
                raise ValueError(
                    f"storage.{name}: not in this process's environment ({var}). The engine's actors read the S3 "
                    "keys from their environment, not from their arguments: on Kubernetes set it from the S3 Secret "
                    "on every Ray pod; on a local Ray, export it before Ray starts (actors.init_local_ray(storage=...))"
                )
            values[name] = SecretStr(value)
        return self.model_copy(update={**values, "credentials_from_env": False})

    def export_credentials(self, environ: dict | None = None) -> None:
        """Put the keys where processes started later read them (os.environ by default)."""
        environ = os.environ if environ is None else environ
        cfg = self.with_credentials()
        for name, var in _S3_KEY_ENV:
            value = getattr(cfg, name).get_secret_value()
            if value:  # an anonymous store leaves the environment as it is
                environ[var] = value

    @classmethod
    def from_env(cls, **overrides) -> "StorageConfig":
        env = os.environ
        values: dict = {}
        for field, var in (
            ("endpoint", "STORYMEM_S3_ENDPOINT"),
            ("bucket", "STORYMEM_S3_BUCKET"),
            ("access_key", "STORYMEM_S3_ACCESS_KEY"),
            ("secret_key", "STORYMEM_S3_SECRET_KEY"),
            ("region", "STORYMEM_S3_REGION"),
        ):
            if env.get(var):
                values[field] = env[var]
        if env.get("STORYMEM_S3_SECURE"):
            values["secure"] = env["STORYMEM_S3_SECURE"].lower() in ("1", "true", "yes")
        values.update(overrides)
        return cls(**values)


class EngineConfig(_Strict):
    """The Ray story engine: pools, retries, fairness."""

    num_generators: int = Field(1, ge=1, le=1024, description="Shot-generator actors in the pool.")
    gpus_per_generator: float = Field(
        0.0, ge=0, le=8, description="GPUs each generator reserves (1 on GPU clusters, 0 on CPU)."
    )
    cpus_per_generator: float = Field(1.0, ge=0, le=256, description="CPUs each generator reserves.")
    generator_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each generator also reserves, to place generators on chosen nodes "
        "(e.g. {\"gpu-node\": 1} with `ray start --resources`).",
    )
    num_scorers: int = Field(1, ge=1, le=256, description="Scorer actors.")
    max_shot_attempts: int = Field(3, ge=1, le=20, description="Attempts per shot across generators.")
    max_queued_stories: int = Field(64, ge=1, le=100000, description="Stories waiting or running; more get 429.")
    max_running_stories: int = Field(16, ge=1, le=10000, description="Stories whose directors run at once.")
    namespace: str = Field("storymem", description="Ray namespace of the named actors.")
    cpus_per_scorer: float = Field(1.0, ge=0, le=256, description="CPUs each scorer actor reserves.")
    gpus_per_scorer: float = Field(0.0, ge=0, le=8, description="GPUs each scorer actor reserves.")
    max_director_attempts: int = Field(
        3, ge=1, le=20, description="Directors started for one run of a story; a director that dies is replaced "
        "by one that resumes from the last committed shot, this many times in all.",
    )
    event_log_capacity: int = Field(2000, ge=10, le=1_000_000, description="Progress events kept per story.")
    cancel_deadline_s: float = Field(
        30.0, gt=0, le=3600, description="A cancel takes effect within this: past it, the generator making the "
        "story's shot is killed and replaced (a denoising step can be long), then its director.",
    )
    step_timeout_s: float = Field(
        900.0, gt=0, le=86400, description="A generator that reports no denoising step for this long is killed "
        "and replaced, and the shot retried on another (hung kernels, stuck devices).",
    )
    detached: bool = Field(
        False, description="Start the engine as a detached actor that outlives the process that started it."
    )


class ServiceLimits(_Strict):
    """What one story may cost: checked at intake, refused with a 422 naming the field.

    Cost is pixels x frames x steps x shots (width * height * num_frames * num_inference_steps *
    shots), the quantity a shot's compute grows with; each factor is bounded on its own too.
    Reference images are bounded by decoded pixels, read from the image header before decoding.
    """

    max_shots: int = Field(100, ge=1, le=100, description="Shots in one story.")
    max_frame_pixels: int = Field(832 * 480, ge=1, description="width * height of a shot.")
    max_frames: int = Field(81, ge=5, description="num_frames of a shot.")
    max_steps: int = Field(50, ge=1, description="num_inference_steps of a shot.")
    max_cost: int = Field(
        832 * 480 * 81 * 50 * 30,
        ge=1,
        description="width * height * num_frames * num_inference_steps * shots of a story "
        "(default: 30 paper-size shots of 50 steps).",
    )
    max_reference_pixels: int = Field(
        4096 * 4096, ge=1, description="Decoded pixels (width * height) of one reference image."
    )
    max_reference_pixels_total: int = Field(
        4 * 2048 * 2048, ge=1, description="Decoded pixels of all reference images of a story together."
    )
    max_queued_per_tenant: int = Field(
        32, ge=1, description="Stories a tenant may have queued or running at once; more get 429."
    )
    max_running_per_tenant: int = Field(
        8, ge=1, description="Stories of one tenant whose directors run at once; the others wait their turn."
    )


class ServiceConfig(_Strict):
    """The HTTP API."""

    host: str = Field("127.0.0.1", description="Bind address of Serve's HTTP proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token required on story routes; env STORYMEM_API_TOKEN."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    ingress_replicas: int = Field(1, ge=1, le=64, description="Replicas of the HTTP ingress deployment.")
    page_size_max: int = Field(100, ge=1, le=1000, description="Largest page of GET /v1/stories.")
    allow_no_auth: bool = Field(
        False,
        description="Serve story routes without a token. Without it the service refuses to start when no "
        "api_token is configured; only for a machine whose API port nobody else can reach.",
    )
    max_ongoing_requests: int = Field(
        256, ge=1, le=100000, description="Requests one ingress replica serves at once (event streams count)."
    )
    ingress_num_cpus: float = Field(0.0, ge=0, le=64, description="CPUs each ingress replica reserves.")
    start_engine: bool = Field(
        True, description="The ingress starts the engine (actors.start_engine) when none runs in the cluster."
    )
    sse_keepalive_s: float = Field(
        15.0, gt=0, le=300, description="Longest silence on an event stream; a comment line is sent then."
    )
    public_s3_endpoint: str | None = Field(
        None,
        description="host:port clients use to reach the object store, when it differs from storage.endpoint "
        "(presigned URLs are signed for this host). None: storage.endpoint.",
    )
    public_s3_secure: bool = Field(False, description="Presigned URLs for public_s3_endpoint use HTTPS.")
    limits: ServiceLimits = Field(default_factory=ServiceLimits, description="Per-story and per-tenant limits.")
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Tenants: tenant id -> API key (from a Kubernetes Secret: env STORYMEM_API_KEYS, JSON "
        "{tenant: key}, or a file named by STORYMEM_API_KEYS_FILE). A key's stories are its tenant's; "
        "api_token stays the admin key, which sees every story.",
    )
    secrets_from_env: bool = Field(
        False,
        description="Set by without_secrets, not by hand: api_token and api_keys are not in this object, and the "
        "process that serves the API reads them from its environment (STORYMEM_API_TOKEN, STORYMEM_API_KEYS or "
        "STORYMEM_API_KEYS_FILE).",
    )
    status_cache_s: float = Field(
        0.25,
        ge=0,
        le=10,
        description="GET /v1/stories/{id} answers from a replica-local copy of the status this young; "
        "concurrent polls of one story share one engine call. 0: always ask the engine.",
    )


    def without_secrets(self) -> "ServiceConfig":
        """The copy that may be a Serve deployment's argument (kept in Ray's GCS): no token, no keys."""
        if self.secrets_from_env or (self.api_token is None and not self.api_keys):
            return self
        return self.model_copy(update={"api_token": None, "api_keys": {}, "secrets_from_env": True})

    def with_secrets(self) -> "ServiceConfig":
        """Token and keys back from this process's environment when without_secrets removed them."""
        if not self.secrets_from_env:
            return self
        out = _service_secrets_from_env(self.model_copy(update={"secrets_from_env": False}))
        if out.api_token is None and not out.api_keys:
            raise ValueError(
                "service.api_token: not in this process's environment (STORYMEM_API_TOKEN, or tenant keys in "
                "STORYMEM_API_KEYS / STORYMEM_API_KEYS_FILE); the API replicas read them from their environment, "
                "not from their arguments: on Kubernetes from the API Secret on every Ray pod"
            )
        return out


def _service_secrets_from_env(v: ServiceConfig) -> ServiceConfig:
    if v.api_token is None and os.environ.get("STORYMEM_API_TOKEN"):
        v.api_token = SecretStr(os.environ["STORYMEM_API_TOKEN"])
    if not v.api_keys:
        keys = os.environ.get("STORYMEM_API_KEYS")
        path = os.environ.get("STORYMEM_API_KEYS_FILE")
        if not keys and path:
            keys = Path(path).read_text()
        if keys:
            data = json.loads(keys)
            if not isinstance(data, dict):
                raise ValueError("STORYMEM_API_KEYS: expected a JSON object {tenant: key}")
            v.api_keys = {str(t): SecretStr(str(k)) for t, k in data.items()}
    return v


class StoryMemConfig(_Strict):
    """Everything a process needs; each section is one concern."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig.from_env)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig, validate_default=True)  # env token applies too
    speed: SpeedConfig = Field(
        default_factory=SpeedConfig,
        description="Speed and memory mode of the generators (storymem.speed; presets exact, cached, fast, "
        "lowvram, compiled). Per deployment: a mode changes the built models.",
    )

    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="Ranks per generator (storymem.parallel): ulysses_degree x ring_degree processes, one GPU each, "
        "make every shot together (actors/gang.py). 1: one process per generator.",
    )

    @model_validator(mode="after")
    def _speed_with_model(self) -> "StoryMemConfig":
        n = self.parallel.world_size
        if n > 1 and self.engine.gpus_per_generator not in (0, n):
            raise ValueError(
                f"engine.gpus_per_generator: a gang of {n} ranks (parallel.ulysses_degree x ring_degree) takes "
                f"{n} GPUs, one per rank (0 on CPU); got {self.engine.gpus_per_generator:g}"
            )
        if self.speed.group_offload != "none" and self.model.offload != "none":
            raise ValueError(
                f"speed.group_offload: {self.speed.group_offload} replaces model.offload; set model.offload "
                f"'none' (got {self.model.offload!r})"
            )
        return self

    @model_validator(mode="after")
    def _resolve_quality_threshold(self) -> "StoryMemConfig":
        # One place knows both the scorer and the filter: 'auto' becomes a number (or no filter) here.
        if self.memory.quality_threshold == "auto":
            self.memory = self.memory.resolved(self.scoring)
        return self

    @field_validator("service", mode="after")
    @classmethod
    def _token_from_env(cls, v: ServiceConfig) -> ServiceConfig:
        return v if v.secrets_from_env else _service_secrets_from_env(v)

    def without_secrets(self) -> "StoryMemConfig":
        """The copy that crosses process boundaries (actor and deployment arguments): no S3 keys, no API
        token or tenant keys. Each process takes them back from its own environment (with_secrets)."""
        return self.model_copy(update={"storage": self.storage.without_credentials(), "service": self.service.without_secrets()})

    def with_secrets(self) -> "StoryMemConfig":
        return self.model_copy(update={"storage": self.storage.with_credentials(), "service": self.service.with_secrets()})


def load_config(path: str | os.PathLike | None = None, **section_overrides) -> StoryMemConfig:
    """Read a YAML or JSON config file (or none: all defaults). Unknown keys are errors."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the config must be a mapping of sections")
    data.update(section_overrides)
    return StoryMemConfig.model_validate(data)
