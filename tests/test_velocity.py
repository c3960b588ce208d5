"""velocity, the v-prediction target: its math against float64 and against diffusers' get_velocity; the
cross-backend suites (tests/backend_cases.py) cover its dtypes, layouts, bad inputs and fakes."""
from __future__ import annotations

import pytest
import torch

import ddpm_fast as F
from backend_cases import backends_here, device_for

SCHEDULE = F.NoiseSchedule.named("cosine", 1000)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_velocity_is_the_v_target_in_float64(backend, dtype):
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, off by at most the output's rounding plus float32 math."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    abar = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0_in, noise_in = x0.to(dtype), noise.to(dtype)
    expect = abar.sqrt() * noise_in.double() - (1 - abar).sqrt() * x0_in.double()
    got = F.velocity(x0_in.to(device), t.to(device), noise_in.to(device), SCHEDULE, backend=backend)
    assert got.dtype == dtype and got.shape == x0.shape
    rounding = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    tol = 4 * torch.finfo(torch.float32).eps + rounding if dtype != torch.float64 else 1e-14
    assert (got.cpu().double() - expect).abs().max() <= tol * (1 + expect.abs().max())


def test_velocity_matches_diffusers_get_velocity_and_the_v_loss_target():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    schedule = F.NoiseSchedule(scheduler.betas.double())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 4, 8, 8, generator=g) * 2 - 1, torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 998])
    torch.testing.assert_close(F.velocity(x0, t, noise, schedule), scheduler.get_velocity(x0, noise, t),
                               rtol=1e-5, atol=1e-5)
    # the training loss of a v model that outputs v exactly is zero: the op is the loss's target
    loss = F.training_losses(F.velocity(x0, t, noise, schedule), x0, t, noise, schedule, mean_type="v")["loss"]
    assert loss.abs().max() < 1e-10


def test_velocity_gradient_runs_on_the_reference():
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([10, 900])
    assert torch.autograd.gradcheck(lambda a, b: F.velocity(a, t, b, SCHEDULE), (x0, noise))
    F.velocity(x0.float(), t, noise.float(), SCHEDULE).sum().backward()  # float32: the compiled op's inputs
