"""Story scripts: both input forms, settings, reference images, error reporting and `storymem validate`."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
from PIL import Image
from pydantic import AfterValidator, BaseModel, ValidationError

from storymem.cli import build_parser, main
from storymem.script import (
    WAN_DEFAULT_NEGATIVE_PROMPT,
    GenerationSettings,
    ImageRef,
    ScriptError,
    Shot,
    StoryRequest,
    StoryScript,
    TransitionMode,
    load_request,
    load_script,
    reject_paths,
)


def _find_st_bench() -> Path | None:
    here = Path(__file__).resolve().parents[2] / "shared" / "st-bench"
    if here.is_dir():
        return here
    env = os.environ.get("STORYMEM_ST_BENCH")
    return Path(env) if env and Path(env).is_dir() else None


ST_BENCH = _find_st_bench()
ST_BENCH_FILES = sorted(p.name for p in ST_BENCH.glob("*.json")) if ST_BENCH else []


def _st_bench_dir() -> Path:
    if ST_BENCH is None:
        pytest.skip("ST-Bench folder not found (set STORYMEM_ST_BENCH)")
    return ST_BENCH


def _png_b64(arr: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _flat_from_st_bench(raw: dict) -> dict:
    shots = []
    for scene in raw["scenes"]:
        for p, f, c in zip(scene["video_prompts"], scene["first_frame_prompt"], scene["cut"]):
            shots.append({"prompt": p, "cut": c, "scene": scene["scene_num"], "first_frame_prompt": f})
    return {"story_name": raw["story_name"], "story_overview": raw["story_overview"], "shots": shots}


# ----------------------------------------------------------------------------------------------
# The benchmark files


def test_st_bench_has_30_stories_and_300_shots():
    assert len(ST_BENCH_FILES) == 30
    total = sum(load_script(_st_bench_dir() / name).num_shots for name in ST_BENCH_FILES)
    assert total == 300


@pytest.mark.parametrize("name", ST_BENCH_FILES)
def test_st_bench_file_parses(name):
    path = _st_bench_dir() / name
    raw = json.loads(path.read_text())
    script = load_script(path)
    expected = sum(len(s["video_prompts"]) for s in raw["scenes"])
    assert script.num_shots == expected
    assert 7 <= script.num_shots <= 12
    assert script.shots[0].cut is True
    assert script.story_name == raw["story_name"]
    assert [s.prompt for s in script.shots] == [p.strip() for sc in raw["scenes"] for p in sc["video_prompts"]]
    assert [s.cut for s in script.shots] == [c for sc in raw["scenes"] for c in sc["cut"]]
    assert [s.scene for s in script.shots] == [sc["scene_num"] for sc in raw["scenes"] for _ in sc["video_prompts"]]
    # Both forms of the same story give the same object, whatever the source type.
    flat = _flat_from_st_bench(raw)
    assert StoryScript.model_validate(flat) == script
    assert load_script(json.dumps(flat)) == script
    assert load_script(path.read_bytes()) == script
    assert load_script(raw) == script
    # The flat dump reloads to the same script.
    assert StoryScript.model_validate(script.model_dump()) == script


def test_st_bench_cut_as_string():
    raw = json.loads((_st_bench_dir() / ST_BENCH_FILES[0]).read_text())
    quoted = copy.deepcopy(raw)
    for scene in quoted["scenes"]:
        scene["cut"] = [str(c) for c in scene["cut"]]  # "True" / "False"
    assert load_script(quoted) == load_script(raw)


# ----------------------------------------------------------------------------------------------
# Invalid inputs: each must name the offending field

FLAT = {"story_name": "t", "shots": [{"prompt": "a red fox runs"}, {"prompt": "the fox sleeps", "cut": False}]}
ST = {
    "story_name": "t",
    "story_overview": "o",
    "scenes": [
        {"scene_num": 1, "video_prompts": ["a", "b"], "first_frame_prompt": ["fa", "fb"], "cut": [True, False]},
        {"scene_num": 2, "video_prompts": ["c"], "first_frame_prompt": ["fc"], "cut": [True]},
    ],
}


def _flat(**changes):
    d = copy.deepcopy(FLAT)
    d.update(changes)
    return d


def _shot(i, **changes):
    d = copy.deepcopy(FLAT)
    d["shots"][i].update(changes)
    return d


def _st(path_value):
    d = copy.deepcopy(ST)
    path, value = path_value
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


def _many(n):
    return {"shots": [{"prompt": f"shot {i}"} for i in range(n)]}


INVALID = [
    ("first_not_cut", _shot(0, cut=False), "shots.0.cut", "first shot"),
    ("first_not_cut_st", _st((("scenes", 0, "cut"), [False, False])), "scenes.0.cut.0", "first shot"),
    ("unequal_lists", _st((("scenes", 1, "first_frame_prompt"), ["x", "y"])), "scenes.1", "1, 2, 1"),
    ("empty_prompt", _shot(0, prompt=""), "shots.0.prompt", "empty"),
    ("blank_prompt", _shot(1, prompt="  \n\t "), "shots.1.prompt", "empty"),
    ("blank_prompt_st", _st((("scenes", 0, "video_prompts"), ["a", "   "])), "scenes.0.video_prompts.1", "empty"),
    ("huge_prompt", _shot(0, prompt="x" * 4001), "shots.0.prompt", "4000"),
    ("cut_typo", _shot(1, cut="flase"), "shots.1.cut", "boolean"),
    ("cut_int", _shot(1, cut=0), "shots.1.cut", "boolean"),
    ("zero_shots", _flat(shots=[]), "shots", "at least 1"),
    ("no_shots_key", {"story_name": "t"}, "shots", "required"),
    ("zero_scenes", _st((("scenes",), [])), "scenes", "at least 1"),
    ("too_many_shots", _many(101), "shots", "100"),
    ("too_many_shots_st", {"scenes": [{"scene_num": 1, "video_prompts": ["p"] * 101,
                                       "first_frame_prompt": [None] * 101, "cut": [True] * 101}]}, "scenes", "101"),
    ("scenes_and_shots", {**ST, "shots": FLAT["shots"]}, "scenes", "not both"),
    ("unknown_field", _flat(foo=1), "foo", "not permitted"),
    ("unknown_shot_field", _shot(0, duration=5), "shots.0.duration", "not permitted"),
    ("unknown_st_key", {**ST, "author": "x"}, "author", "not permitted"),
    ("unknown_scene_key", _st((("scenes", 0, "mood"), "dark")), "scenes.0.mood", "not permitted"),
    ("long_name", _flat(story_name="n" * 201), "story_name", "200"),
    ("frames_not_4n1", _flat(settings={"num_frames": 80}), "settings.num_frames", "4n+1"),
    ("frames_too_many", _flat(settings={"num_frames": 261}), "settings.num_frames", "257"),
    ("width_not_16", _flat(settings={"width": 840}), "settings.width", "multiple of 16"),
    ("width_absurd", _flat(settings={"width": 100000}), "settings.width", "2048"),
    ("height_zero", _flat(settings={"height": 0}), "settings.height", "32"),
    ("fix_over_bank", _flat(settings={"max_memory_size": 4, "fix": 5}), "settings.fix", "max_memory_size"),
    ("skip_every_frame", _flat(settings={"num_frames": 9, "keyframe_skip": 9}), "settings.keyframe_skip", "below num_frames"),
    ("skip_negative", _flat(settings={"keyframe_skip": -1}), "settings.keyframe_skip", "0"),
    ("seed_negative", _flat(settings={"seed": -1}), "settings.seed", "0"),
    ("shift_zero", _flat(settings={"shift": 0}), "settings.shift", "greater than 0"),
    ("transition_bogus", _flat(settings={"transition": "crossfade"}), "settings.transition", "mi2v"),
    ("unknown_setting", _flat(settings={"cfg": 3}), "settings.cfg", "not permitted"),
    ("huge_negative", _flat(settings={"negative_prompt": "n" * 2001}), "settings.negative_prompt", "2000"),
    ("wrapped_error", {"script": _shot(0, prompt=""), "settings": {}}, "script.shots.0.prompt", "empty"),
    ("wrapped_extra", {"script": FLAT, "priority": 1}, "priority", "not permitted"),
    ("image_not_image", _flat(reference_images=[{"data": base64.b64encode(b"hello, not a png").decode()}]),
     "reference_images.0.data", "PNG"),
    ("image_bad_base64", _flat(reference_images=[{"data": "@@@not base64@@@"}]), "reference_images.0.data", "base64"),
    ("image_gif", _flat(reference_images=[{"data": _png_b64(np.zeros((4, 4, 3), np.uint8), "GIF")}]),
     "reference_images.0.data", "GIF"),
    ("image_neither", _flat(reference_images=[{}]), "reference_images.0", "exactly one"),
    ("image_both", _flat(reference_images=[{"data": _png_b64(np.zeros((4, 4, 3), np.uint8)), "path": "a.png"}]),
     "reference_images.0", "exactly one"),
    ("image_too_many", _flat(reference_images=[{"data": _png_b64(np.zeros((4, 4, 3), np.uint8))}] * 11),
     "reference_images", "10"),
    ("bad_json", '{"shots": [{"prompt": "a",}]}', "<json>", "line 1 column"),
    ("json_list", "[1, 2]", "<json>", "object"),
]


@pytest.mark.parametrize("data,field,words", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_input_names_field(data, field, words):
    with pytest.raises(ScriptError) as info:
        load_request(data)
    err = info.value
    assert isinstance(err, ValueError)
    fields = dict(err.errors)
    assert field in fields, err.errors
    assert words.lower() in fields[field].lower(), err.errors
    assert f"{field}: " in str(err)


def test_valid_baselines_of_the_invalid_corpus():
    # The corpus edits valid documents; make sure the originals themselves pass.
    assert load_request(FLAT).script.num_shots == 2
    assert load_request(ST).script.num_shots == 3
    assert load_request(_many(100)).script.num_shots == 100


def test_image_over_size_limit():
    huge = "A" * (12 * 1024 * 1024)
    with pytest.raises(ScriptError) as info:
        load_request(_flat(reference_images=[{"data": huge}]))
    assert "MiB" in dict(info.value.errors)["reference_images.0.data"]


def test_truncated_png_rejected_where_it_is_decoded():
    # Validation reads the header only; the pixels are decoded once, where the image is used (the
    # service's intake, the runner), and a truncated file fails there with the field named.
    from storymem.service.contract import InvalidRequest
    from storymem.service.intake import normalise

    raw = base64.b64decode(_png_b64(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    cut = base64.b64encode(raw[: len(raw) // 2]).decode()
    ref = ImageRef(data=cut)
    with pytest.raises(ValueError, match="corrupt PNG"):
        ref.load()
    with pytest.raises(InvalidRequest) as err:
        normalise({"shots": [{"prompt": "a"}], "reference_images": [{"data": cut}]})
    assert err.value.errors[0][0] == "reference_images.0.data"


# ----------------------------------------------------------------------------------------------
# Reference images


def test_image_ref_roundtrip_png_and_data_uri():
    rgb = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    b64 = _png_b64(rgb)
    for data in (b64, "data:image/png;base64," + b64, b64[:30] + "\n" + b64[30:]):
        out = ImageRef(data=data).load()
        assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
        np.testing.assert_array_equal(out, rgb)


def test_image_ref_jpeg_and_rgba():
    rgb = np.full((16, 24, 3), 128, np.uint8)
    jpg = ImageRef(data=_png_b64(rgb, "JPEG")).load()
    assert jpg.shape == (16, 24, 3) and abs(int(jpg.mean()) - 128) <= 2
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    out = ImageRef(data=_png_b64(rgba)).load()
    assert out.shape == (5, 7, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_image_path_resolves_against_script_folder(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "hero.png")
    script_file = tmp_path / "story.json"
    script_file.write_text(json.dumps(_flat(reference_images=[{"path": "hero.png"}])))
    script = load_script(script_file)
    ref = script.reference_images[0]
    assert Path(ref.path).is_absolute()
    np.testing.assert_array_equal(ref.load(), rgb)
    # Relative to an explicit base_dir, ImageRef.load finds the same file.
    np.testing.assert_array_equal(ImageRef(path="hero.png").load(base_dir=tmp_path), rgb)
    with pytest.raises(ValueError, match="path"):
        ImageRef(path="missing.png").load(base_dir=tmp_path)


def test_missing_reference_file_is_a_script_error(tmp_path):
    script_file = tmp_path / "story.json"
    script_file.write_text(json.dumps(_flat(reference_images=[{"path": "nope.png"}])))
    with pytest.raises(ScriptError) as info:
        load_script(script_file)
    assert "reference_images.0.path" in dict(info.value.errors)


def test_reject_paths():
    png = {"data": _png_b64(np.zeros((4, 4, 3), np.uint8))}
    script = StoryScript.model_validate(_flat(reference_images=[png, {"path": "/etc/passwd"}]))
    with pytest.raises(ScriptError) as info:
        reject_paths(script)
    assert [f for f, _ in info.value.errors] == ["reference_images.1.path"]
    with pytest.raises(ScriptError) as info:
        reject_paths(StoryRequest(script=script))
    assert [f for f, _ in info.value.errors] == ["script.reference_images.1.path"]
    ok = StoryScript.model_validate(_flat(reference_images=[png]))
    assert reject_paths(ok) is ok
    # A service loads with allow_paths=False: the path is refused before anything reads it.
    with pytest.raises(ScriptError) as info:
        load_request(_flat(reference_images=[{"path": "/definitely/not/here.png"}]), allow_paths=False)
    assert "not accepted" in dict(info.value.errors)["reference_images.0.path"]


# ----------------------------------------------------------------------------------------------
# Settings and requests


def test_settings_defaults_are_the_papers():
    s = GenerationSettings()
    assert (s.width, s.height, s.num_frames, s.fps, s.num_inference_steps) == (832, 480, 81, 16, 40)
    assert (s.guidance_scale, s.shift, s.seed, s.max_memory_size, s.fix) == (3.5, 4.0, 0, 10, 3)
    assert s.keyframe_skip == 0  # the method's rule: the first frame that passes the quality filter
    assert s.transition is TransitionMode.MI2V
    assert s.effective_guidance_scale_2 == 3.5
    assert GenerationSettings(guidance_scale_2=5).effective_guidance_scale_2 == 5
    assert s.effective_negative_prompt == WAN_DEFAULT_NEGATIVE_PROMPT == GenerationSettings.default_negative_prompt()
    assert GenerationSettings(negative_prompt="").effective_negative_prompt == ""
    # The authors' released inference (docs/reference.md), each a setting that can be changed.
    assert s.memory_mask == "ones" and GenerationSettings(memory_mask="sink_window").memory_mask == "sink_window"
    assert s.sigma_schedule == "wan" and GenerationSettings(sigma_schedule="diffusers").sigma_schedule == "diffusers"
    assert (s.t2v_shift, s.t2v_guidance_scale) == (12.0, None)  # None: guidance_scale, 3.5
    for name, field in GenerationSettings.model_fields.items():
        assert field.description, name


def test_default_negative_prompt_is_wans_verbatim():
    import hashlib

    neg = WAN_DEFAULT_NEGATIVE_PROMPT
    # sample_neg_prompt of Wan2.1/Wan2.2's wan/configs/shared_config.py: 137 characters, 28 phrases.
    assert len(neg) == 137 and neg.count("\uff0c") == 27
    assert neg.startswith("\u8272\u8c03\u8273\u4e3d\uff0c\u8fc7\u66dd\uff0c") and neg.endswith("\u5012\u7740\u8d70")
    assert "JPEG\u538b\u7f29\u6b8b\u7559" in neg
    assert hashlib.sha256(neg.encode()).hexdigest() == "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"


def test_size_follows_the_first_reference_unless_set():
    s = GenerationSettings()
    assert s.size_from_reference is True and "size_from_reference" not in s.model_dump(exclude_unset=True)
    assert (s.fit_reference(832, 480).width, s.fit_reference(832, 480).height) == (480, 832)  # portrait
    assert (s.fit_reference(480, 832).width, s.fit_reference(480, 832).height) == (832, 480)
    wide = s.fit_reference(1080, 1920)  # 16:9 at the 832x480 area, sides multiples of 16
    assert (wide.width, wide.height) == (848, 480) and wide.width % 16 == wide.height % 16 == 0
    for explicit in ({"width": 832}, {"height": 480}, {"size_from_reference": False}):
        g = GenerationSettings(**explicit)
        assert g.size_from_reference is False and g.fit_reference(832, 480) is g
    # A profile's size is a default, not the story's choice: the reference still decides the shape.
    tiny = GenerationSettings().resolve({"width": 64, "height": 48})
    assert tiny.size_from_reference is True and (tiny.fit_reference(600, 400).width, tiny.fit_reference(600, 400).height) == (48, 64)
    assert GenerationSettings(width=64).resolve({"height": 48}).size_from_reference is False
    forced = GenerationSettings(width=64, height=48, size_from_reference=True)
    assert (forced.fit_reference(100, 50).width, forced.fit_reference(100, 50).height) == (32, 80)


def test_resolve_keeps_explicit_and_fills_unset():
    tiny = {"width": 64, "height": 32, "num_frames": 9, "num_inference_steps": 4, "max_memory_size": 4, "fix": 1}
    s = GenerationSettings.model_validate({"width": 128, "seed": 7, "transition": "mm2v"})
    r = s.resolve(tiny)
    assert (r.width, r.seed, r.transition) == (128, 7, TransitionMode.MM2V)  # explicit: kept
    assert (r.height, r.num_frames, r.num_inference_steps, r.max_memory_size, r.fix) == (32, 9, 4, 4, 1)
    assert r.guidance_scale == 3.5 and r.shift == 4.0  # in neither: the paper's default
    assert s.width == 128 and s.height == 480  # the original is untouched
    # An explicit default value still counts as explicit.
    assert GenerationSettings(height=480).resolve(tiny).height == 480
    with pytest.raises(ValueError, match="bogus"):
        s.resolve({"bogus": 1})
    # The merged settings are validated as a whole.
    with pytest.raises(ScriptError) as info:
        GenerationSettings(fix=3).resolve({"max_memory_size": 2})
    assert "settings.fix" in dict(info.value.errors)


def test_request_forms_agree():
    settings = {"width": 480, "height": 832, "seed": 3}
    wrapped = load_request({"script": ST, "settings": settings})
    bare_st = load_request({**ST, "settings": settings})
    flat_text = json.dumps({**_flat_from_st_bench({**ST}), "settings": settings})
    bare_flat = load_request(flat_text)
    assert wrapped == bare_st == bare_flat
    assert wrapped.settings.width == 480 and wrapped.settings.model_fields_set == {"width", "height", "seed"}
    assert StoryRequest.model_validate({**ST, "settings": settings}) == wrapped
    assert load_request(FLAT).settings == GenerationSettings()
    # load_script accepts a request-shaped file too and returns its script.
    assert load_script({"script": ST}) == wrapped.script
    # A bare script model forbids 'settings': it belongs to the request.
    with pytest.raises(ValidationError):
        StoryScript.model_validate({**FLAT, "settings": {}})
    # The service's OpenAPI schema can be built.
    assert "script" in StoryRequest.model_json_schema()["properties"]


def test_prompts_are_stripped_and_optional_fields_default():
    shot = Shot(prompt="  a fox  ")
    assert shot.prompt == "a fox" and shot.cut is True and shot.scene is None and shot.first_frame_prompt is None


def test_script_error_from_validation_error_readable_paths():
    def positive(v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    class M(BaseModel):
        x: Annotated[int, AfterValidator(positive)] | list[str]

    with pytest.raises(ValidationError) as info:
        M(x=-1)
    err = ScriptError.from_validation_error(info.value)
    assert ("x", "must be positive") in err.errors
    assert all("[" not in f for f, _ in err.errors)
    assert str(err).splitlines() == [f"{f}: {p}" for f, p in err.errors]


def test_missing_file_and_source_type():
    with pytest.raises(ScriptError) as info:
        load_script("/no/such/story.json")
    assert info.value.errors[0][0] == "<file>"
    with pytest.raises(ScriptError):
        load_script(42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# storymem validate


def _run_cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "storymem.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_validate_ok_and_bad_writes_nothing(tmp_path):
    inputs, work = tmp_path / "in", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    good = _st_bench_dir() / "cat.json"
    expected = load_script(good)
    bad = inputs / "bad.json"
    bad.write_text(json.dumps({**_shot(0, cut=False, prompt="fine"), "settings": {"num_frames": 80}, "oops": 1}))

    ok = _run_cli(["validate", str(good)], work)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: {expected.num_shots} shots ({expected.story_name})"

    fail = _run_cli(["validate", str(bad)], work)
    assert fail.returncode == 2
    lines = fail.stderr.strip().splitlines()
    assert any(line.startswith("settings.num_frames: ") for line in lines), lines
    assert any(line.startswith("oops: ") for line in lines), lines
    assert fail.stdout == ""
    assert list(work.iterdir()) == []


def test_cli_validate_settings_file(tmp_path, capsys):
    good = _st_bench_dir() / "cat.json"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"max_memory_size": 2}))  # fix stays 3: invalid together
    assert main(["validate", str(good), "--settings", str(settings)]) == 2
    assert "settings.fix: " in capsys.readouterr().err
    settings.write_text(json.dumps({"max_memory_size": 2, "fix": 1}))
    assert main(["validate", str(good), "--settings", str(settings)]) == 0
    assert capsys.readouterr().out.startswith("ok: 10 shots")
    settings.write_text("{not json")
    assert main(["validate", str(good), "--settings", str(settings)]) == 2
    assert "--settings: " in capsys.readouterr().err
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"shots": [\n  {"prompt": "a"\n]}')
    assert main(["validate", str(bad_json)]) == 2
    assert capsys.readouterr().err.startswith("<json>: line 3")


def test_cli_parser_has_subcommands():
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])
    assert info.value.code == 2
    assert parser.parse_args(["validate", "x.json"]).command == "validate"
