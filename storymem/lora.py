"""The released M2V LoRA sets on diffusers' Wan transformer, as named, stackable peft adapters.

The authors' checkpoints (`backbone_high_noise.pth`, `backbone_low_noise.pth`) are peft state dicts
on Wan's native module names. We rename each key to diffusers' names and load it into a peft LoRA
(rank from the tensors, alpha = rank unless told, rsLoRA scale alpha / sqrt(r)). A key we cannot
map is an error: a silently skipped LoRA layer is a wrong model that still runs.

The release holds two sets, `Wan2.2-MI2V-A14B/` and `Wan2.2-MM2V-A14B/`, one pair of files (high-
and low-noise expert) each. `load_release(folder)` finds them as `LoraSet`s; an `AdapterStack` puts
each set on the experts as a named adapter (`m2v_mi2v`, `m2v_mm2v`) and switches per shot to the set
of the story's transition (`select_set`). Further adapters (speed LoRAs) stack on the same object
with their own weights: `add(..., pinned=True)` keeps one on under every activation.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

# Wan native module path (inside a block) -> diffusers module path.
NATIVE_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_DIFFUSERS_TARGETS = set(NATIVE_TO_DIFFUSERS.values())

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:diffusion_model\.|transformer\.|model\.)?"
    r"blocks\.(?P<block>\d+)\.(?P<module>.+?)\.(?P<which>lora_[AB])(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$"
)

M2V_TARGET_SUFFIXES = sorted(_DIFFUSERS_TARGETS)


class LoraKeyError(ValueError):
    """A LoRA file holds keys this loader cannot place on the model."""


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LoraKeyError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def convert_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename native or diffusers-named LoRA keys to `blocks.N.<diffusers module>.lora_{A,B}.weight`."""
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            bad.append(key)
            continue
        module = m["module"]
        if module in NATIVE_TO_DIFFUSERS:
            module = NATIVE_TO_DIFFUSERS[module]
        elif module not in _DIFFUSERS_TARGETS:
            bad.append(key)
            continue
        new = f"blocks.{m['block']}.{module}.{m['which']}.weight"
        if new in out:
            raise LoraKeyError(f"two keys map to {new} (several adapters in one file?): {key}")
        out[new] = tensor
    if bad:
        raise LoraKeyError(f"{len(bad)} LoRA keys do not map to a Wan transformer module, e.g. {bad[:5]}")
    if not out:
        raise LoraKeyError("the LoRA state dict is empty")
    return out


def lora_rank(state_dict: dict[str, torch.Tensor]) -> int:
    ranks = {t.shape[0] for k, t in state_dict.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise LoraKeyError(f"expected one LoRA rank, found {sorted(ranks)}")
    return ranks.pop()


def load_m2v_lora(
    transformer,
    source: str | Path | dict,
    adapter_name: str = "m2v",
    alpha: float | None = None,
    use_rslora: bool = True,
    fuse: bool = False,
) -> dict:
    """Add the M2V LoRA to a diffusers WanTransformer3DModel.

    Returns a report {"rank", "alpha", "modules", "scale"}. Raises LoraKeyError if any key in the
    file has no place in the model, or any targeted module receives no weights.
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    raw = source if isinstance(source, dict) else read_lora_file(source)
    sd = convert_to_diffusers(raw)
    rank = lora_rank(sd)
    alpha = float(rank if alpha is None else alpha)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    names = dict(transformer.named_modules())
    missing_modules = [m for m in modules if m not in names]
    if missing_modules:
        raise LoraKeyError(f"LoRA targets modules the model lacks (fewer blocks?): {missing_modules[:5]}")
    for key, tensor in sd.items():
        module = names[key.rsplit(".lora_", 1)[0]]
        if ".lora_A." in key and tensor.shape[1] != module.in_features:
            raise LoraKeyError(f"{key}: shape {tuple(tensor.shape)} does not fit in_features {module.in_features}")
        if ".lora_B." in key and tensor.shape[0] != module.out_features:
            raise LoraKeyError(f"{key}: shape {tuple(tensor.shape)} does not fit out_features {module.out_features}")

    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=modules, lora_dropout=0.0, init_lora_weights=False
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, sd, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing:
        raise LoraKeyError(f"LoRA did not load cleanly: unexpected {unexpected[:5]}, missing {missing[:5]}")
    if fuse:
        transformer.fuse_lora(adapter_names=[adapter_name])
        transformer.unload_lora()
    scale = alpha / (rank**0.5) if use_rslora else alpha / rank
    return {"rank": rank, "alpha": alpha, "modules": len(modules), "scale": scale}


def native_lora_state_dict(transformer, rank: int, prefix: str = "base_model.model.", generator=None) -> dict:
    """A random LoRA state dict with the released files' key names and shapes for `transformer`.

    Used by tests and benchmarks to exercise the loader without the released weights."""
    inverse = {v: k for k, v in NATIVE_TO_DIFFUSERS.items()}
    out = {}
    for name, module in transformer.named_modules():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in inverse:
            continue
        native = f"{prefix}blocks.{m.group(1)}.{inverse[m.group(2)]}"
        out[f"{native}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.02
        out[f"{native}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.02
    return out


# ------------------------------------------------------------------------------------ LoRA sets

TRANSITIONS = ("none", "mi2v", "mm2v")  # storymem.script.TransitionMode values (no torch-free import here)
EXPERTS = ("high", "low")
# Released set folders (Hugging Face Kevin-thu/StoryMem) -> (set key, adapter name). Each set is
# trained for M2V plus its own continuation, so it serves transition "none" too.
RELEASE_FOLDERS = {"mi2v": "Wan2.2-MI2V-A14B", "mm2v": "Wan2.2-MM2V-A14B"}
RELEASE_FILE_STEMS = {"high": "backbone_high_noise", "low": "backbone_low_noise"}
# Transition "none" (M2V shots only) is served by either released set; the MI2V set is taken when
# both are loaded, so the choice never depends on load order.
NONE_PREFERENCE = ("mi2v", "mm2v")


@dataclass(frozen=True)
class LoraSet:
    """A pair of LoRA files (one per expert) loaded together as one named adapter.

    name: the peft adapter name on every expert. transitions: the story transitions (values of
    TransitionMode) it serves. files: expert ("high"/"low") -> a file path or a state dict.
    key: the release's set key ("mi2v", "mm2v") or "custom"."""

    name: str
    transitions: frozenset[str]
    files: Mapping[str, Path | dict]
    key: str = "custom"
    weight: float = 1.0

    def __post_init__(self):
        bad = sorted(set(self.transitions) - set(TRANSITIONS))
        if bad:
            raise ValueError(f"transitions: {bad} are not among {list(TRANSITIONS)}")
        extra = sorted(set(self.files) - set(EXPERTS))
        if extra or not self.files:
            raise ValueError(f"files: experts must be among {list(EXPERTS)}, got {sorted(self.files)}")


def _release_file(folder: Path, expert: str) -> Path:
    stem = RELEASE_FILE_STEMS[expert]
    # safetensors first: it loads without unpickling.
    for suffix in (".safetensors", ".pth", ".pt"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors or {stem}.pth")


def load_release(folder: str | Path, sets: Iterable[str] | None = None) -> list[LoraSet]:
    """The released LoRA sets under `folder` (the Kevin-thu/StoryMem snapshot).

    sets: set keys to load ("mi2v", "mm2v"); None: every set folder present (at least one must be).
    Raises FileNotFoundError naming the folder or file that is missing. Files are not read here."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.lora_release: {folder} is not a folder")
    wanted = list(RELEASE_FOLDERS) if sets is None else list(dict.fromkeys(sets))
    unknown = [k for k in wanted if k not in RELEASE_FOLDERS]
    if unknown:
        raise ValueError(f"model.lora_release_sets: {unknown} are not among {list(RELEASE_FOLDERS)}")
    out = []
    for key in wanted:
        sub = folder / RELEASE_FOLDERS[key]
        if not sub.is_dir():
            if sets is None:
                continue
            raise FileNotFoundError(
                f"model.lora_release: {folder} has no {RELEASE_FOLDERS[key]}/ (set {key!r} was asked for)"
            )
        files = {e: _release_file(sub, e) for e in EXPERTS}
        out.append(LoraSet(name=f"m2v_{key}", transitions=frozenset({"none", key}), files=files, key=key))
    if not out:
        raise FileNotFoundError(
            f"model.lora_release: {folder} holds none of {', '.join(f + '/' for f in RELEASE_FOLDERS.values())}"
        )
    return out


def configured_sets(cfg) -> list[LoraSet]:
    """The LoRA sets a ModelConfig names: the release's, or the single pair of files, or none."""
    if cfg.lora_release is not None:
        return load_release(cfg.lora_release, cfg.lora_release_sets)
    files = {e: p for e, p in (("high", cfg.lora_high_noise), ("low", cfg.lora_low_noise)) if p is not None}
    if not files:
        return []
    for e, p in files.items():
        if not Path(p).is_file():
            raise FileNotFoundError(f"model.lora_{e}_noise: LoRA file not found: {p}")
    return [LoraSet(name="m2v", transitions=frozenset(cfg.lora_transitions), files=files)]


def supported_transitions(sets: Sequence[LoraSet]) -> frozenset[str]:
    """Transitions a model with these sets can make. No set at all: the base model is taken as the
    M2V model itself (merged weights, the embedded tiny model) and serves every transition."""
    if not sets:
        return frozenset(TRANSITIONS)
    return frozenset().union(*(s.transitions for s in sets))


def select_set(sets: Sequence[LoraSet], transition: str) -> LoraSet | None:
    """The set a story with this transition uses; None when there are no sets. Raises ValueError
    naming `settings.transition` when no loaded set serves it (never a silent wrong LoRA)."""
    transition = getattr(transition, "value", transition)
    if not sets:
        return None
    serving = [s for s in sets if transition in s.transitions]
    if not serving:
        loaded = ", ".join(f"{s.name} ({'/'.join(sorted(s.transitions))})" for s in sets)
        raise ValueError(f"settings.transition: {transition!r} has no loaded LoRA set; loaded: {loaded}")
    if len(serving) > 1 and transition == "none":
        rank = {k: i for i, k in enumerate(NONE_PREFERENCE)}
        serving.sort(key=lambda s: rank.get(s.key, len(rank)))
    return serving[0]


@dataclass
class _Adapter:
    name: str
    weight: float
    pinned: bool
    experts: tuple[str, ...]
    report: dict = field(default_factory=dict)


class AdapterStack:
    """Named peft LoRA adapters on the experts of one pipeline, switched as a group.

    experts: expert name -> WanTransformer3DModel ("high" = transformer, "low" = transformer_2;
    a one-transformer model passes {"low": transformer}, the low-noise file being its LoRA).

    `activate(names, weights)` switches the experts to exactly those adapters (plus the pinned
    ones) at those weights, through diffusers' `set_adapters`. fuse="auto": when the stack holds at
    most one adapter that is not pinned, the active combination can never change, so it is merged
    into the base weights (`fuse_lora`: no LoRA cost per step); otherwise adapters stay unfused and
    switching costs nothing. A stack that gains an adapter later unfuses first. fuse="never" keeps
    every adapter unfused.
    """

    def __init__(self, experts: Mapping[str, torch.nn.Module | None], fuse: Literal["auto", "never"] = "auto"):
        if fuse not in ("auto", "never"):
            raise ValueError(f"fuse: {fuse!r} is not 'auto' or 'never'")
        self.experts = {k: v for k, v in experts.items() if v is not None}
        bad = sorted(set(self.experts) - set(EXPERTS))
        if bad or not self.experts:
            raise ValueError(f"experts: names must be among {list(EXPERTS)}, got {sorted(experts)}")
        self.fuse = fuse
        self.adapters: dict[str, _Adapter] = {}
        self.active: tuple[str, ...] = ()
        self.weights: dict[str, float] = {}
        self.fused = False

    # -- loading
    def add(
        self,
        name: str,
        sources: Mapping[str, str | Path | dict],
        weight: float = 1.0,
        pinned: bool = False,
        alpha: float | None = None,
        use_rslora: bool = True,
    ) -> dict:
        """Load a LoRA as adapter `name` on the experts `sources` names (expert -> file or state
        dict). Returns {expert: load report}. The adapter is inactive until `activate` names it
        (pinned: every activation includes it)."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise ValueError(f"adapter name {name!r}: letters, digits and '_' only")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        unknown = sorted(set(sources) - set(self.experts))
        if unknown or not sources:
            raise ValueError(f"adapter {name!r}: experts {unknown or '(none)'} not in this stack {sorted(self.experts)}")
        self._unfuse()
        reports = {}
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several named adapters are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                for expert, source in sources.items():
                    reports[expert] = load_m2v_lora(
                        self.experts[expert], source, adapter_name=name, alpha=alpha, use_rslora=use_rslora
                    )
        except BaseException:
            for model in self.experts.values():
                if name in (getattr(model, "peft_config", None) or {}):
                    model.delete_adapters(name)
            self._apply(self.active)
            raise
        self.adapters[name] = _Adapter(name, float(weight), pinned, tuple(sources), reports)
        self._apply(self.active)  # peft activates a newly added adapter; put the previous state back
        return reports

    def adopt(self, name: str, experts: Sequence[str], weight: float = 1.0, pinned: bool = False) -> None:
        """Register adapter `name`, already loaded on `experts` by another loader (diffusers' own
        `load_lora_adapter`, for LoRA formats `add` does not read: storymem.speed's LightX2V files),
        so that activations switch it with the others."""
        if self.fused:
            raise ValueError(f"adapter {name!r}: adopt it before the stack is first activated (fused)")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        missing = [e for e in experts if name not in (getattr(self.experts.get(e), "peft_config", None) or {})]
        if missing or not experts:
            raise ValueError(f"adapter {name!r}: not loaded on experts {missing or '(none)'}")
        self.adapters[name] = _Adapter(name, float(weight), pinned, tuple(experts), {})
        self._apply(self.active)  # loading activated it; put the previous state back

    def add_set(self, lora: LoraSet, pinned: bool = False) -> dict:
        """`add` for a LoraSet, keeping the files of the experts this stack has."""
        sources = {e: f for e, f in lora.files.items() if e in self.experts}
        if not sources and len(self.experts) == 1:
            # One transformer and only the other expert's file (single-file configs): it is its LoRA.
            sources = {next(iter(self.experts)): next(iter(lora.files.values()))}
        return self.add(lora.name, sources, weight=lora.weight, pinned=pinned)

    # -- switching
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def _fixed(self) -> bool:
        return self.fuse == "auto" and sum(not a.pinned for a in self.adapters.values()) <= 1

    def activate(self, names: Sequence[str] = (), weights: Sequence[float] | Mapping[str, float] | None = None) -> None:
        """Switch to exactly `names` (plus the pinned adapters) at `weights` (default: each
        adapter's own weight). An empty selection without pinned adapters leaves the base model."""
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"adapters {unknown} are not loaded (loaded: {self.names})")
        if weights is None:
            weights = {}
        elif not isinstance(weights, Mapping):
            weights = list(weights)
            if len(weights) != len(names):
                raise ValueError(f"weights: {len(weights)} values for {len(names)} adapters")
            weights = dict(zip(names, weights))
        chosen = tuple(dict.fromkeys([*names, *(a.name for a in self.adapters.values() if a.pinned)]))
        w = {n: float(weights.get(n, self.adapters[n].weight)) for n in chosen}
        fuse = bool(chosen) and self._fixed()
        if chosen == self.active and w == self.weights and self.fused == fuse:
            return
        self._unfuse()
        self._apply(chosen, w)
        if fuse:
            for expert, model in self.experts.items():
                here = [n for n in chosen if expert in self.adapters[n].experts]
                if here:
                    model.fuse_lora(adapter_names=here)
            self.fused = True

    def disable(self) -> None:
        """Every adapter off, pinned ones too: the base model."""
        self._unfuse()
        self._apply(())

    def _apply(self, chosen: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        weights = dict(weights or {n: self.weights.get(n, self.adapters[n].weight) for n in chosen})
        for expert, model in self.experts.items():
            if not getattr(model, "peft_config", None):
                continue
            here = [n for n in chosen if expert in self.adapters[n].experts]
            if here:
                model.enable_lora()
                model.set_adapters(here, [weights[n] for n in here])
            else:
                model.disable_lora()
        self.active, self.weights = tuple(chosen), {n: weights[n] for n in chosen}

    def _unfuse(self) -> None:
        if self.fused:
            for model in self.experts.values():
                if getattr(model, "peft_config", None):
                    model.unfuse_lora()
            self.fused = False

    def describe(self) -> dict:
        return {
            "adapters": {
                a.name: {"weight": a.weight, "pinned": a.pinned, "experts": list(a.experts)}
                for a in self.adapters.values()
            },
            "active": list(self.active),
            "weights": dict(self.weights),
            "fused": self.fused,
        }
