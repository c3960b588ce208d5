"""A seed draws the same noise whatever the memory layout, on every backend that runs here.

In-kernel noise is drawn at each element's logical index (b * N + row-major index within the sample),
never at its position in memory, so p_sample_step / ddim_step (eta > 0) seeded give the same sample for
contiguous, channels_last and sliced (strided) inputs holding the same values. The backends that draw
with Philox (all but the reference, which draws torch.randn from a torch.Generator(seed)) share one stream,
so they also agree with each other. Backends come from backend_cases.backends_here(): one added to
ddpm_fast.availability() joins these tests by itself.

Tolerances: across layouts the arithmetic per element is the same, so the results are compared exactly;
across backends the float32 rounding of the step's mean differs, so torch's float32 defaults apply
(rtol 1.3e-6, atol 1e-5); a layout-dependent draw differs by O(1) (0.85-1.4 measured here before the fix).
"""
import pytest
import torch

import ddpm_fast as F
from backend_cases import SCHEDULE, backends_here, device_for

LAYOUTS = ("contiguous", "channels_last", "sliced")
STEPS = {
    "p_sample_step": lambda mo, xt, t, **kw: F.p_sample_step(mo, xt, t, SCHEDULE, mean_type="epsilon",
                                                             var_type="learned_range", **kw),
    "ddim_step": lambda mo, xt, t, **kw: F.ddim_step(mo, xt, t, SCHEDULE, eta=0.7, var_type="learned_range", **kw),
}


def _layout(x, kind):
    """The same values as x in another memory layout."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # every other element of a wider tensor: last-dim stride 2
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


# sample shapes: N = 60 per sample, a multiple of 4 (the fused backends then draw contiguous layouts by whole
# Philox blocks, four draws each, the others element by element: compared exactly below), and N = 105 (sample 2
# starts inside a block, at counter 210: element by element, except the CUDA kernels' vectors that start on one)
SHAPES = {"N60": (3, 4, 5), "N105": (3, 5, 7)}


def _inputs(device, shape):
    """x_t [3, *shape], a learned-range model output [3, 2 * shape[0], *shape[1:]], t (60; 0: no noise; 40)."""
    g = torch.Generator().manual_seed(21)
    x_t = torch.randn(3, *shape, generator=g).to(device)
    mo = torch.randn(3, 2 * shape[0], *shape[1:], generator=g).to(device)
    return mo, x_t, torch.tensor([60, 0, 40], device=device)


def _samples(backend, step, shape=SHAPES["N60"]):
    mo, x_t, t = _inputs(device_for(backend), shape)
    return {kind: STEPS[step](_layout(mo, kind), _layout(x_t, kind), t, seed=1234, backend=backend)["sample"].cpu()
            for kind in LAYOUTS}


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("backend", backends_here())
def test_same_seed_same_noise_for_every_layout(backend, step):
    got = _samples(backend, step)
    for kind in LAYOUTS[1:]:
        assert torch.equal(got[kind], got["contiguous"]), (
            f"{backend} {step}: {kind} differs from contiguous by "
            f"{(got[kind] - got['contiguous']).abs().max().item():.3g}")
    other = _samples(backend, step) if backend == "reference" else None
    if other is not None:  # the reference seeds a fresh torch.Generator: also reproducible
        assert torch.equal(other["contiguous"], got["contiguous"])


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("step", sorted(STEPS))
def test_philox_backends_draw_the_same_noise(step, shape):
    philox = [b for b in backends_here() if b != "reference"]
    if len(philox) < 2:
        pytest.skip(f"fewer than two Philox backends here: {philox}")
    first = _samples(philox[0], step, SHAPES[shape])
    for backend in philox[1:]:
        got = _samples(backend, step, SHAPES[shape])
        for kind in LAYOUTS:
            torch.testing.assert_close(got[kind], first[kind], msg=lambda m: f"{backend} vs {philox[0]} ({kind}): {m}")
