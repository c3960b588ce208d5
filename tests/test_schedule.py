"""NoiseSchedule: named schedules, tables, the packed device table, respacing, bad betas."""
import math
import pickle

import numpy as np
import pytest
import torch

from ddpm_fast import COLUMNS, NoiseSchedule, space_timesteps


def test_linear_is_improved_diffusions_scaled_range():
    for T in (1000, 250, 4000):
        b = NoiseSchedule.named("linear", T).betas
        scale = 1000 / T
        assert b.shape == (T,) and b.dtype == torch.float64
        assert b[0].item() == pytest.approx(1e-4 * scale, rel=1e-14)
        assert b[-1].item() == pytest.approx(0.02 * scale, rel=1e-14)
        assert torch.allclose(b.diff(), b.diff()[0].expand(T - 1), rtol=1e-9, atol=0)


def test_cosine_matches_its_alpha_bar_and_cap():
    T = 1000
    s = NoiseSchedule.named("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Uncapped steps: abar_t is exactly f((t+1)/T) / f(0).
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_scaled_linear_and_sigmoid():
    sl = NoiseSchedule.named("scaled_linear", 1000).betas
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    assert torch.allclose(sl.sqrt().diff(), sl.sqrt().diff()[0].expand(999), rtol=1e-9, atol=0)
    sg = NoiseSchedule.named("sigmoid", 1000).betas
    assert torch.all(sg.diff() > 0)
    assert sg[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(6)), rel=1e-12)
    assert sg[499].item() + sg[500].item() == pytest.approx(0.02 + 1e-4, rel=1e-12)  # symmetric about the middle


def test_tables_follow_their_definitions():
    s = NoiseSchedule.named("linear", 100)
    b = s.betas
    abar = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(s.alphas_cumprod, abar, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], abar[:-1], rtol=0, atol=0)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))
    assert s.fixed_large_variance[0].item() == s.posterior_variance[1].item()
    torch.testing.assert_close(s.fixed_large_variance[1:], b[1:], rtol=0, atol=0)
    torch.testing.assert_close(s.snr, abar / (1 - abar), rtol=1e-14, atol=0)


def test_packed_table_is_float32_and_cached():
    s = NoiseSchedule.named("cosine", 50)
    tab = s.table("cpu")
    assert tab.shape == (50, len(COLUMNS)) and tab.dtype == torch.float32 and tab.is_contiguous()
    assert s.table("cpu") is tab
    for i, name in enumerate(COLUMNS):
        assert torch.equal(tab[:, i], getattr(s, name).float()), name
    assert s.table("cpu", torch.float64).dtype == torch.float64
    # Pickling (e.g. to a data-parallel worker) drops the device cache and keeps the tables.
    s2 = pickle.loads(pickle.dumps(s))
    assert torch.equal(s2.table("cpu"), tab)


def test_zero_terminal_snr():
    base = NoiseSchedule.named("scaled_linear", 1000)
    s = NoiseSchedule.named("scaled_linear", 1000, rescale_zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert s.betas[-1].item() == 1.0
    assert s.snr[-1].item() == 0.0


@pytest.mark.parametrize("bad", [np.zeros((2, 3)) + 0.1, [], [0.1, 0.0], [0.1, 1.5], [-0.1], [0.1, float("nan")]])
def test_invalid_betas_raise(bad):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(bad)


def test_bad_named_arguments():
    with pytest.raises(ValueError, match="name"):
        NoiseSchedule.named("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.named("linear", 0)


def test_space_timesteps_ddim_and_sections():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    steps = sorted(space_timesteps(300, [10, 15, 20]))
    assert len(steps) == 45
    sections = [[s for s in steps if lo <= s < lo + 100] for lo in (0, 100, 200)]
    assert [len(x) for x in sections] == [10, 15, 20]
    assert [(x[0], x[-1]) for x in sections] == [(0, 99), (100, 199), (200, 299)]
    assert space_timesteps(300, "10,15,20") == set(steps)
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(100, [60, 60])  # more steps than a section has
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(1000, "ddim600")  # strides 1 and 2 give 1000 and 500 steps


def test_respacing_keeps_alphas_cumprod_and_maps_back():
    s = NoiseSchedule.named("linear", 1000)
    keep = sorted(space_timesteps(1000, "ddim50"))
    r = s.respace(keep)
    assert r.num_timesteps == 50 and r.is_respaced
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[keep], rtol=1e-13, atol=0)
    assert r.timestep_map.tolist() == keep
    # Respacing a respaced schedule maps to the original timesteps.
    rr = r.respace([0, 10, 49])
    assert rr.timestep_map.tolist() == [keep[0], keep[10], keep[49]]
    with pytest.raises(ValueError, match="use_timesteps"):
        s.respace([0, 1000])
