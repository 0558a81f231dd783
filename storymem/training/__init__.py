"""M2V training: memory-conditioned flow matching on a Wan image-to-video transformer.

The authors did not release their training code; this follows the paper's description (method.md,
'Training'): single-shot clips, each with 1..N memory frames drawn from *other* clips of the same
group (story / character), the mask and negative RoPE positions exactly as at inference, and the
flow-matching loss on the shot's latent frames only. Conditioning goes through the same code as
inference: `StoryMemPipeline.encode_memory / encode_condition_video / encode_prompt / vae_encode`
and `m2v.build_mask / build_condition / memory_frames`.

Data: a Parquet clip manifest, one row per clip (clip_id, group_id, path, prompt; see `data`).
Clips are resized (bicubic) to the training size and cut to its first `num_frames` frames.

Modes: a LoRA per expert (rank/alpha/rsLoRA/dropout/targets as method.md gives them) with timesteps
drawn from each expert's range (high noise: sigma >= boundary), or full fine-tuning (`full`), which
the tiny from-scratch models of the synthetic world need. Options beyond the paper's recipe, off by
default: MI2V samples (`motion_prob`, conditioned on their own first frame) and a loss on the memory
frames (`memory_loss_weight`); a from-scratch model needs both to learn what a pretrained I2V base
already does (see scripts/train_embedded.py). Data parallel with torch DDP (gloo on CPU,
nccl on GPU); every random choice is a function of (seed, step, global sample index), so a run on W
processes with batch B computes the same global batch as one process with batch W * B.

Outputs (`output_dir/checkpoints/step-NNNNNNN/`, and `output_dir/final/`):
    lora_high_noise.safetensors / lora_low_noise.safetensors (or lora.safetensors for one transformer):
        diffusers-named LoRA weights that `storymem.lora.load_m2v_lora` loads (the training scale is
        folded into lora_B, so the loader's default alpha = rank reproduces the trained model);
    embedded.safetensors (full mode, embedded models): a bundle for ModelConfig.embedded_weights;
    transformer.safetensors / transformer_2.safetensors (full mode, local models);
    model_config.json: the ModelConfig fields that select these weights;
    trainer_state.pt: step, optimizer, LR scheduler, RNG and the exact trainable tensors (resume).

Modules:
    config.py      TrainConfig, the one validated object a run is given;
    data.py        the clip manifest (read_clip_manifest), clip loading, cached latents (ClipLatents);
    loss.py        M2VLoss, the flow-matching loss under the M2V mask and memory RoPE;
    trainer.py     Trainer (setup, sample plan, steps, checkpoints, outputs) and train();
    vae_recipe.py  the tiny-VAE recipe of the embedded models (reinit, train_vae, normalise_vae_latents);
    scorer_recipe.py  the embedded scorer's recipe (tiny CLIP image tower + visibility head on toy frames);
    grow.py        grow_transformer: more blocks / wider feed-forward layers, same function (continue bigger);
    cli.py         `storymem train` (add_train_parser, config_from_args, run_train).
"""

from .cli import add_train_parser, config_from_args, run_train
from .config import TrainConfig
from .data import MANIFEST_COLUMNS, ClipLatents, ClipRecord, load_clip, read_clip_manifest
from .grow import grow_transformer
from .loss import M2VLoss
from .trainer import ADAPTER, EXPERT_FILES, SINGLE_FILE, STATE_FILE, Trainer, fresh_copy, lora_scale, train
from .vae_recipe import normalise_vae_latents, reinit_autoencoder, train_vae

__all__ = [
    "ADAPTER", "EXPERT_FILES", "MANIFEST_COLUMNS", "SINGLE_FILE", "STATE_FILE", "ClipLatents", "ClipRecord", "M2VLoss",
    "TrainConfig", "Trainer", "add_train_parser", "config_from_args", "fresh_copy", "grow_transformer", "load_clip", "lora_scale",
    "normalise_vae_latents", "read_clip_manifest", "reinit_autoencoder", "run_train", "train", "train_vae",
]
