"""Building and loading the Wan components.

Two sources, one result (a dict of pipeline components):

* `load_local(cfg)`: diffusers-format folders on local disk (Wan2.2-I2V-A14B-Diffusers and
  optionally Wan2.2-T2V-A14B-Diffusers, or a smaller Wan checkpoint), never a hub.
* `build_embedded(cfg)`: tiny Wan-architecture models from small configs in code, so the whole
  system runs on a CPU. Seeded, so every process builds identical weights; a shipped weights bundle
  (trained on the synthetic world, see storymem.toyworld) replaces the random ones when present.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

from .config import ModelConfig
from .script import WAN_NEGATIVE_PROMPT_EN

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_BUNDLE = ASSETS / "tiny_m2v.safetensors"
EMBEDDED_SEED = 20251219

# Character-level vocabulary of the embedded tokenizer: lower-case text, digits, punctuation.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()/&%+=*#@$_[]<>"
_SPECIALS = ["<pad>", "</s>", "<unk>"]

# The negative prompt the shipped tiny bundle was trained with (its text dropout) and samples with:
# Wan's default is Chinese, which the embedded character-level tokenizer cannot spell (every
# character would be <unk>), so the embedded profile keeps an English rendering of it.
EMBEDDED_NEGATIVE_PROMPT = WAN_NEGATIVE_PROMPT_EN


@dataclass(frozen=True)
class TinyWanConfig:
    """Sizes of the embedded models (small enough for CPU tests and the demo)."""

    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_sequence_length: int = 128
    vae_base_dim: int = 16
    # 4x spatial (two downsampling stages) rather than Wan's 8x: at 64x48 an 8x latent is 8x6, too
    # coarse for a tiny decoder to give a small character its colours back. Temporal stays 4x.
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    vae_temporal_downsample: tuple[bool, ...] = (True, True)
    z_dim: int = 16
    heads: int = 2
    head_dim: int = 32
    layers: int = 4
    ffn_dim: int = 256
    freq_dim: int = 64
    rope_max_seq_len: int = 64
    two_experts: bool = True
    # A text-to-video transformer for shot 1 and shots without memory (in_channels z_dim, one expert), as
    # Wan2.2-T2V is to the M2V model on real weights; a bundle that carries one turns this on.
    t2v: bool = False
    # Generation settings the embedded profile uses when a story leaves them unset.
    defaults: dict = field(
        default_factory=lambda: {
            "width": 64,
            "height": 48,
            "num_frames": 13,
            "num_inference_steps": 8,
            "guidance_scale": 2.0,
            # trained with memory dropout, so the no-memory pass is in distribution (method.md's prototype)
            "memory_guidance_scale": 3.0,
            # how the shipped bundle was trained (scripts/train_embedded.py): window memory frames masked 2,
            # English negative prompt; the paper's defaults ('ones', Wan's Chinese prompt) are for real weights
            "memory_mask": "sink_window",
            "negative_prompt": EMBEDDED_NEGATIVE_PROMPT,
            # One memory frame, kept for the whole story: the first keyframe the scorer passes (the first
            # frame after frame 0 where the character is visible). This tiny model conditions worst on
            # more frames of one character (docs/identity.md: 3 or 6 frames raise the colour error); real
            # weights keep the paper's bank of 10 with a sink of 3.
            "max_memory_size": 1,
            "fix": 1,
            # Its generated frame 0 is twice as far from the rest of its shot as any later frame (colour
            # 0.085-0.09 against 0.04-0.06), and with one memory frame that frame would be the story's memory.
            "keyframe_skip": 1,
            # Sampling of the embedded text-to-video transformer, when the bundle has one: the M2V model's shift
            # (it was trained on the same uniform sigmas), not Wan2.2-T2V's 12.
            "t2v_shift": 4.0,
        }
    )


@dataclass
class ModelProfile:
    """What the loaded models imply for generation: default settings and limits."""

    name: str
    defaults: dict
    max_sequence_length: int
    boundary: float | None
    t2v_boundary: float | None = None  # expert switch of the text-to-video pair; None: no T2V pair
    has_t2v: bool = False  # a text-to-video model makes shot 1 (else the M2V model with empty memory)
    # TransitionMode values the loaded LoRA sets serve (build_pipeline fills it in); stories with
    # another transition are refused at submission (storymem.script.check_transition_supported).
    transitions: frozenset[str] = frozenset({"none", "mi2v", "mm2v"})


def embedded_tokenizer():
    """A character-level fast tokenizer built entirely in code (no files, no hub)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + list(_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_transformer(tiny: TinyWanConfig, in_channels: int) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=tiny.heads,
        attention_head_dim=tiny.head_dim,
        in_channels=in_channels,
        out_channels=tiny.z_dim,
        text_dim=tiny.text_dim,
        freq_dim=tiny.freq_dim,
        ffn_dim=tiny.ffn_dim,
        num_layers=tiny.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=tiny.rope_max_seq_len,
    )


def make_scheduler(shift: float = 4.0) -> UniPCMultistepScheduler:
    """UniPC on flow-matching sigmas, as Wan2.2 samples."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )


def build_embedded(cfg: ModelConfig | None = None, tiny: TinyWanConfig | None = None, seed: int = EMBEDDED_SEED):
    """The embedded default: tiny text encoder, VAE, two M2V experts (36-channel input) and, when the
    bundle carries one (or `tiny.t2v`), a text-to-video transformer (16-channel input) that makes shot 1
    and every shot without memory, as Wan2.2-T2V does on real weights.

    Without one, shot 1 uses the M2V transformer with no memory and an empty condition (the tiny model
    is trained with memory dropped for some samples, so that case is in distribution), and the shot's
    manifest record says so."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = cfg or ModelConfig()
    if cfg.embedded_weights == "random":
        bundle = None
    else:
        bundle = cfg.embedded_weights or (EMBEDDED_BUNDLE if EMBEDDED_BUNDLE.exists() else None)
    tiny = tiny or TinyWanConfig()
    t2v_sizes = {}
    if bundle is not None:
        # A bundle trained at other transformer sizes (scripts/train_embedded.py --layers/--ffn-dim) says so.
        tiny = replace(tiny, **bundle_transformer_sizes(bundle))
        if bundle_has_part(bundle, "t2v_transformer"):
            tiny, t2v_sizes = replace(tiny, t2v=True), bundle_transformer_sizes(bundle, "t2v_transformer")
    tokenizer = embedded_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=tiny.text_dim,
                d_kv=tiny.text_dim // tiny.text_heads,
                d_ff=tiny.text_dim * 2,
                num_layers=tiny.text_layers,
                num_heads=tiny.text_heads,
                relative_attention_num_buckets=16,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        vae = AutoencoderKLWan(
            base_dim=tiny.vae_base_dim,
            z_dim=tiny.z_dim,
            dim_mult=list(tiny.vae_dim_mult),
            num_res_blocks=1,
            temperal_downsample=list(tiny.vae_temporal_downsample),
        )
        in_ch = 2 * tiny.z_dim + 4
        transformer = tiny_transformer(tiny, in_ch)
        transformer_2 = tiny_transformer(tiny, in_ch) if tiny.two_experts else None
        # Seeded after the M2V experts, so that adding it leaves their initialisation as it was.
        t2v_transformer = tiny_transformer(replace(tiny, **t2v_sizes), tiny.z_dim) if tiny.t2v else None
    components = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        transformer_2=transformer_2.eval() if transformer_2 is not None else None,
        t2v_transformer=t2v_transformer.eval() if t2v_transformer is not None else None,
        t2v_transformer_2=None,
        scheduler=make_scheduler(),
    )
    if bundle is not None:
        load_bundle(components, bundle)
    profile = ModelProfile(
        name="embedded-tiny" + ("" if bundle is None else f"({Path(bundle).name})"),
        defaults=dict(tiny.defaults),
        max_sequence_length=tiny.max_sequence_length,
        boundary=cfg.boundary if tiny.two_experts else None,
        has_t2v=tiny.t2v,
    )
    return components, profile


_BUNDLE_PARTS = ("text_encoder", "vae", "transformer", "transformer_2", "t2v_transformer")
# TinyWanConfig field -> WanTransformer3DModel config key, for the sizes a bundle records.
_TRANSFORMER_SIZES = {"heads": "num_attention_heads", "head_dim": "attention_head_dim", "layers": "num_layers", "ffn_dim": "ffn_dim"}


def bundle_has_part(path: str | Path, part: str) -> bool:
    """Whether a bundle holds weights of `part` (one of the bundle's parts, e.g. 't2v_transformer')."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(part + ".") for k in f.keys())


def bundle_transformer_sizes(path: str | Path, part: str = "transformer") -> dict:
    """The TinyWanConfig sizes a bundle's transformer `part` was saved with ({} for a bundle from before
    they were recorded: those have the TinyWanConfig defaults)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    sizes = json.loads(meta.get(f"{part}_sizes", "{}"))
    unknown = set(sizes) - set(_TRANSFORMER_SIZES)
    if unknown:
        raise ValueError(f"{path}: unknown transformer sizes {sorted(unknown)} in the bundle's metadata")
    return {k: int(v) for k, v in sizes.items()}


def save_bundle(components: dict, path: str | Path) -> None:
    """One safetensors file with every module of the embedded models, keyed 'part.param'."""
    from safetensors.torch import save_file

    tensors = {}
    for part in _BUNDLE_PARTS:
        module = components.get(part)
        if module is None:
            continue
        for k, v in module.state_dict().items():
            # clone: tied weights (the text encoder's embeddings) share storage, which safetensors refuses
            tensors[f"{part}.{k}"] = v.detach().to(torch.float32).contiguous().clone()
    meta = {"format": "storymem-embedded-v1"}
    for part in ("transformer", "t2v_transformer"):
        if components.get(part) is not None:
            config = components[part].config
            meta[f"{part}_sizes"] = json.dumps({k: int(config[v]) for k, v in _TRANSFORMER_SIZES.items()})
    save_file(tensors, str(path), metadata=meta)


def load_bundle(components: dict, path: str | Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for part in _BUNDLE_PARTS:
        module = components.get(part)
        sd = {k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".")}
        if module is None or not sd:
            continue
        missing, unexpected = module.load_state_dict(sd, strict=False)
        # Non-persistent buffers (rotary tables) are rebuilt in code; any other gap is a wrong file.
        missing = [m for m in missing if "rope" not in m]
        if missing or unexpected:
            raise ValueError(f"{path}: {part} does not match the embedded config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _read_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder}: not a diffusers model folder (no model_index.json)")
    return json.loads(index.read_text())


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_local(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
    """Load Wan components from local diffusers folders (local_files_only: nothing is downloaded)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    if cfg.i2v_path is None:
        raise ValueError("model.i2v_path: the M2V base model folder is required when weights are configured")
    i2v = Path(cfg.i2v_path)
    index = _read_index(i2v)
    kw = dict(local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(i2v / "tokenizer", **kw)
    text_encoder = UMT5EncoderModel.from_pretrained(i2v / "text_encoder", dtype=dtype, **kw)
    # Wan's VAE is kept in float32: bf16 visibly degrades decoded frames for little memory.
    vae = AutoencoderKLWan.from_pretrained(i2v, subfolder="vae", torch_dtype=torch.float32, **kw)
    transformer = WanTransformer3DModel.from_pretrained(i2v, subfolder="transformer", torch_dtype=dtype, **kw)
    transformer_2 = None
    if (i2v / "transformer_2").exists():
        transformer_2 = WanTransformer3DModel.from_pretrained(i2v, subfolder="transformer_2", torch_dtype=dtype, **kw)
    z = vae.config.z_dim
    if transformer.config.in_channels != 2 * z + 4:
        raise ValueError(
            f"model.i2v_path: transformer has {transformer.config.in_channels} input channels; M2V needs "
            f"{2 * z + 4} (noisy latent + 4 mask + condition latent), i.e. a Wan image-to-video model"
        )
    t2v_transformer = t2v_transformer_2 = None
    if cfg.t2v_path is not None:
        t2v = Path(cfg.t2v_path)
        _read_index(t2v)
        t2v_transformer = WanTransformer3DModel.from_pretrained(t2v, subfolder="transformer", torch_dtype=dtype, **kw)
        if (t2v / "transformer_2").exists():
            t2v_transformer_2 = WanTransformer3DModel.from_pretrained(
                t2v, subfolder="transformer_2", torch_dtype=dtype, **kw
            )
    boundary = index.get("boundary_ratio", cfg.boundary) if transformer_2 is not None else None
    if boundary is not None:
        boundary = cfg.boundary if "boundary" in cfg.model_fields_set else boundary
    t2v_boundary = None
    if t2v_transformer_2 is not None:
        t2v_boundary = _read_index(Path(cfg.t2v_path)).get("boundary_ratio", cfg.t2v_boundary)
        t2v_boundary = cfg.t2v_boundary if "t2v_boundary" in cfg.model_fields_set else t2v_boundary
    if t2v_transformer is None:
        log.warning(
            "model.t2v_path is not set: shot 1 of a story without reference images is made by the M2V model "
            "with empty memory, not by Wan2.2-T2V as in the paper"
        )
    components = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        transformer_2=transformer_2.eval() if transformer_2 is not None else None,
        t2v_transformer=t2v_transformer.eval() if t2v_transformer is not None else None,
        t2v_transformer_2=t2v_transformer_2.eval() if t2v_transformer_2 is not None else None,
        scheduler=make_scheduler(),
    )
    profile = ModelProfile(
        name=i2v.name,
        defaults={},
        max_sequence_length=512,
        boundary=boundary,
        t2v_boundary=t2v_boundary,
        has_t2v=t2v_transformer is not None,
    )
    return components, profile
