"""M2V conditioning: rotary positions, mask values, condition layout."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from storymem.m2v import MemoryRotaryPosEmbed, ShotMode, build_condition, build_mask, memory_frames, pixel_mask
from storymem.script import MemoryMask


def _rope(shift=5):
    base = WanRotaryPosEmbed(attention_head_dim=24, patch_size=(1, 2, 2), max_seq_len=64)
    return base, MemoryRotaryPosEmbed.from_wan(base, shift=shift)


def test_zero_memory_equals_diffusers_rope():
    base, mem = _rope()
    x = torch.zeros(1, 36, 6, 8, 12)
    for a, b in zip(base(x), mem(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("m,shift", [(1, 5), (3, 5), (10, 5), (4, 2)])
def test_memory_positions_are_negative_multiples_of_shift(m, shift):
    _, rope = _rope(shift)
    rope.num_memory_frames = m
    pos = rope.temporal_positions(m + 7)
    expected = [-(m - i) * shift for i in range(m)] + list(range(7))
    assert pos.tolist() == expected


def test_rotary_angles_match_explicit_positions():
    """Token angles of frame k must equal those diffusers gives position p(k) (checked via the
    temporal slice of cos/sin: cos(p * freq))."""
    base, rope = _rope(shift=5)
    m, f, hh, ww = 3, 4, 2, 2
    x = torch.zeros(1, 36, m + f, hh * 2, ww * 2)
    with torch.no_grad():
        rope.num_memory_frames = m
        cos, sin = rope(x)
    t_dim = rope.t_dim
    tokens_per_frame = hh * ww
    cos = cos.view(m + f, tokens_per_frame, -1)[:, 0, :t_dim]
    sin = sin.view(m + f, tokens_per_frame, -1)[:, 0, :t_dim]
    # Frequencies of the temporal band: position 1 of the base table gives them directly.
    freqs = torch.atan2(base.freqs_sin[1, :t_dim], base.freqs_cos[1, :t_dim])
    positions = torch.tensor([-15.0, -10.0, -5.0, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(cos, torch.cos(positions[:, None] * freqs[None, :]).to(cos.dtype))
    torch.testing.assert_close(sin, torch.sin(positions[:, None] * freqs[None, :]).to(sin.dtype))
    # Spatial bands are untouched by memory.
    base_cos, _ = base(torch.zeros(1, 36, f, hh * 2, ww * 2))
    torch.testing.assert_close(
        rope(x)[0].view(m + f, tokens_per_frame, -1)[m:, :, t_dim:],
        base_cos.view(f, tokens_per_frame, -1)[:, :, t_dim:],
    )


def test_memory_frames_context_restores():
    _, rope = _rope()

    class T:  # a stand-in holder with a .rope attribute, as the transformer has
        pass

    t = T()
    t.rope = rope
    with memory_frames(t, 4):
        assert rope.num_memory_frames == 4
    assert rope.num_memory_frames == 0


def test_too_many_memory_frames_rejected():
    _, rope = _rope()
    rope.num_memory_frames = 5
    with pytest.raises(ValueError, match="num_memory_frames"):
        rope(torch.zeros(1, 36, 3, 4, 4))


@pytest.mark.parametrize("m", [0, 1, 3, 5, 10])
def test_pixel_mask_default_marks_every_memory_frame_one(m):
    # The authors' released inference: memory frames 1 whatever M and fix, conditioned frames 1, rest 0.
    F = 81
    for mode, k in ((ShotMode.M2V, 0), (ShotMode.MR2V, 0), (ShotMode.MI2V, 1), (ShotMode.MM2V, 5)):
        mask = pixel_mask(m, F, mode, fix=3)
        assert mask.tolist() == [1.0] * m + [1.0] * k + [0.0] * (F - k), (mode, m)


def test_pixel_mask_sink_window_option():
    m, F = 5, 81
    plain = pixel_mask(m, F, ShotMode.M2V, fix=3, memory_mask=MemoryMask.SINK_WINDOW)
    assert plain[:3].tolist() == [1, 1, 1] and plain[3:5].tolist() == [2, 2]
    assert plain[m:].sum() == 0
    mi2v = pixel_mask(m, F, ShotMode.MI2V, fix=3, memory_mask="sink_window")
    assert mi2v[:m].tolist() == [1, 1, 1, 2, 2] and mi2v[m] == 1 and mi2v[m + 1 :].sum() == 0
    mm2v = pixel_mask(m, F, ShotMode.MM2V, fix=3, memory_mask="sink_window")
    assert mm2v[m : m + 5].tolist() == [1] * 5 and mm2v[m + 5 :].sum() == 0
    small = pixel_mask(2, F, ShotMode.M2V, fix=3, memory_mask="sink_window")  # M <= fix: all memory frames are sink
    assert small[:2].tolist() == [1, 1]
    with pytest.raises(ValueError):
        pixel_mask(2, F, ShotMode.M2V, memory_mask="twos")


@pytest.mark.parametrize("memory_mask", list(MemoryMask))
@pytest.mark.parametrize("mode", list(ShotMode))
def test_latent_mask_layout(mode, memory_mask):
    m, F, fix = 6, 81, 3
    mask = build_mask(m, F, 3, 5, mode, fix=fix, memory_mask=memory_mask)
    f = (F - 1) // 4 + 1
    assert mask.shape == (4, m + f, 3, 5)
    # Memory latent frames: each image encoded alone -> its value in all 4 channels.
    for i in range(m):
        want = 2.0 if memory_mask == MemoryMask.SINK_WINDOW and i >= fix else 1.0
        assert torch.all(mask[:, i] == want)
    first = mask[:, m]
    if mode in (ShotMode.MI2V, ShotMode.MM2V):
        assert torch.all(first == 1)
    else:
        assert torch.all(first == 0)
    second = mask[:, m + 1]  # pixel frames 1..4
    assert torch.all(second == (1 if mode == ShotMode.MM2V else 0))
    assert torch.all(mask[:, m + 2 :] == 0)


def test_condition_layout():
    z, m, f, h, w = 16, 3, 5, 2, 3
    mem = torch.randn(1, z, m, h, w)
    u = torch.randn(1, z, f, h, w)
    mask = build_mask(m, 17, h, w, ShotMode.MI2V, fix=3)
    cond = build_condition(mem, u, mask)
    assert cond.shape == (1, 4 + z, m + f, h, w)
    torch.testing.assert_close(cond[:, 4:, :m], mem)
    torch.testing.assert_close(cond[:, 4:, m:], u)
    torch.testing.assert_close(cond[0, :4], mask)
    with pytest.raises(ValueError):
        build_condition(mem, u, build_mask(m + 1, 17, h, w))
