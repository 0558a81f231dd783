"""`TrainConfig`: every setting of one M2V training run, validated once, documented field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ModelConfig
from ..lora import M2V_TARGET_SUFFIXES
from ..script import MemoryMask


class TrainConfig(BaseModel):
    """Everything one training run needs. Paths may be relative to the working directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    manifest: str = Field(description="Parquet manifest of clips: a local file, or an object key in `store`.")
    store: str | None = Field(
        None, description="Where clips (and the manifest) live: 's3://bucket' or a folder. None: local paths."
    )
    output_dir: Path = Field(description="Checkpoints, logs and the final weights go here.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model (embedded tiny or local Wan).")

    task: Literal["m2v", "t2v"] = Field(
        "m2v",
        description="'m2v': the memory-to-video transformer(s), samples with memory from other shots of their story; "
        "'t2v': the embedded model's text-to-video transformer (shot 1 and shots without memory), every sample "
        "text-only, no condition channels. Real Wan T2V weights are used as released (the paper trains no T2V).",
    )
    full: bool = Field(False, description="Train every transformer weight instead of a LoRA (tiny models).")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random': re-initialise the transformers from their config (with full=True)."
    )
    experts: Literal["both", "high", "low"] = Field(
        "both", description="Which expert(s) to train; 'both' splits each batch between them by share."
    )
    high_noise_share: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of samples for the high-noise expert.")
    boundary: float | None = Field(
        None, ge=0.0, le=1.0, description="Expert switch on sigma (timestep / 1000). None: the model config's."
    )

    lora_rank: int = Field(128, ge=1, le=4096, description="LoRA rank r.")
    lora_alpha: float = Field(128.0, gt=0, description="LoRA alpha; scale alpha / sqrt(r) with rsLoRA.")
    use_rslora: bool = Field(True, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_targets: list[str] = Field(
        default_factory=lambda: list(M2V_TARGET_SUFFIXES),
        description="diffusers module-name suffixes that get a LoRA (self/cross attention q/k/v/o, FFN).",
    )

    height: int | None = Field(None, ge=16, description="Training frame height; None: the model profile's default.")
    width: int | None = Field(None, ge=16, description="Training frame width; None: the model profile's default.")
    num_frames: int | None = Field(None, ge=1, description="Frames per clip (4n+1); None: the profile's default.")

    min_memory: int = Field(1, ge=1, description="Fewest memory frames of a conditioned sample.")
    max_memory: int = Field(10, ge=1, le=64, description="Most memory frames of a sample.")
    memory_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of steps trained without memory (keeps shot 1 / T2V in distribution)."
    )
    memory_candidates: int = Field(
        3, ge=1, le=256, description="Frames of a clip that may serve as memory (evenly spaced, first and last included)."
    )
    fix: int = Field(
        3, ge=0, description="Memory sink size; with memory_mask 'sink_window' the first `fix` memory frames get 1, later ones 2."
    )
    memory_mask: MemoryMask = Field(
        MemoryMask.ONES, description="Mask value of memory frames, as at inference (GenerationSettings.memory_mask)."
    )
    motion_prob: float = Field(0.0, ge=0.0, le=1.0, description="Share of samples conditioned on their first frame (MI2V).")
    text_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of samples whose prompt is replaced by a negative prompt (for CFG)."
    )
    uncond_prompts: list[str] | None = Field(
        None, description="Prompts used by text dropout; None: the pipeline's and the scripts' default negatives."
    )
    timestep_shift: float = Field(1.0, gt=0.0, description="1: sigma uniform; s > 1 shifts samples to high noise.")
    noise_offset: float = Field(
        0.0,
        ge=0.0,
        le=4.0,
        description="Per-channel offset added to each sample's noise, constant over time and space, the sum "
        "renormalised to unit variance (storymem.pipeline.offset_noise, which the pipeline's noise_offset "
        "samples with). 0: i.i.d. noise (the paper). > 0 trains the model to remove a frame-wide colour "
        "shift of the noise (diffusers' training scripts offer the same as noise_offset, unrenormalised).",
    )
    memory_loss_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the loss on the memory latent frames. 0 (the paper): shot frames only, the base "
        "I2V model already denoises conditioned frames. A model trained from scratch needs it (> 0) to learn "
        "that, since sampling also integrates its velocity on the memory frames.",
    )
    first_frame_loss_weight: float = Field(
        1.0,
        gt=0.0,
        description="Weight of the shot's first latent frame in the shot loss (a weighted mean, so the loss "
        "keeps its scale). 1: every frame alike (the paper). The causal VAE gives frame 0 a latent of its own "
        "that MI2V samples receive as a condition, so it sees the fewest generated examples; > 1 makes up for it.",
    )

    subject_loss_weight: float = Field(
        1.0,
        ge=1.0,
        description="Weight of the subject's latent cells in the shot loss (a weighted mean, so the loss keeps "
        "its scale); needs the manifest's subject_mask column. 1: every cell alike (the paper). A small "
        "subject covers few latent cells, so nearly all of the loss is background that the text already "
        "fixes; > 1 puts more of it on the identity that memory must carry.",
    )

    batch_size: int = Field(4, ge=1, description="Clips per process per step.")
    steps: int = Field(1000, ge=1, description="Optimizer steps in total (resume continues to this number).")
    lr: float = Field(1e-5, gt=0.0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine decay floor as a fraction of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = Field("constant", description="LR schedule after warm-up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm; None: no clipping.")
    gradient_checkpointing: bool = Field(False, description="Recompute transformer blocks in backward (large models).")
    compile: bool = Field(
        False,
        description="torch.compile the training step's forward (experts and loss) with inductor. On the tiny "
        "embedded model on 2 CPU cores an M2V step costs 0.38 s against 0.43 s eager, a text-to-video one 0.32 "
        "against 0.33; the first step of each memory length pays for compiling (15-60 s there). Evaluation "
        "stays eager.",
    )
    seed: int = Field(0, ge=0, description="Every random choice derives from (seed, step, sample index).")
    cache_latents: bool = Field(True, description="Keep VAE latents and text embeddings of seen clips in memory.")
    save_every: int = Field(500, ge=1, description="Checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    log_every: int = Field(10, ge=1, description="Log the loss every this many steps.")
    resume: bool = Field(True, description="Continue from the latest checkpoint in output_dir when there is one.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_memory > self.max_memory:
            raise ValueError(f"min_memory: {self.min_memory} exceeds max_memory {self.max_memory}")
        if self.init == "random" and not self.full:
            raise ValueError("init: 'random' needs full=True (a LoRA on a random model learns nothing useful)")
        if self.num_frames is not None and (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames: must be 4n+1, got {self.num_frames}")
        if not self.lora_targets:
            raise ValueError("lora_targets: at least one module suffix is required")
        if self.task == "t2v":
            if not self.model.embedded:
                raise ValueError("task: 't2v' trains the embedded model's text-to-video transformer; real Wan T2V weights are used as released")
            if not self.full:
                raise ValueError("task: 't2v' needs full=True (no loader takes a text-to-video LoRA)")
            if self.motion_prob > 0:
                raise ValueError(f"motion_prob: a text-to-video model takes no motion frames, got {self.motion_prob}")
        return self
