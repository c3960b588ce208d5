"""The public functional API: names, argument handling, dtypes, and clear errors."""
import inspect

import pytest
import torch

import ddpm_fast as F

S = F.NoiseSchedule.named("linear", 100)


def test_signatures_keep_the_documented_argument_order():
    expected = {
        "q_sample": ["x0", "t", "noise", "schedule"],
        "q_posterior": ["x0", "x_t", "t", "schedule"],
        "normal_kl": ["mean1", "logvar1", "mean2", "logvar2"],
        "discretized_gaussian_log_likelihood": ["x", "means", "log_scales"],
        "vb_terms_bpd": ["model_output", "x0", "x_t", "t", "schedule"],
        "prior_bpd": ["x0", "schedule"],
        "training_losses": ["model_output", "x0", "t", "noise", "schedule"],
        "p_sample_step": ["model_output", "x_t", "t", "schedule"],
        "ddim_step": ["model_output", "x_t", "t", "schedule"],
    }
    for name, positional in expected.items():
        params = inspect.signature(getattr(F, name)).parameters.values()
        got = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert got == positional, name
        assert "backend" in inspect.signature(getattr(F, name)).parameters


def test_int_and_0dim_t_broadcast():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    a = F.q_sample(x0, 7, noise, S)
    b = F.q_sample(x0, torch.tensor(7), noise, S)
    c = F.q_sample(x0, torch.full((3,), 7, dtype=torch.int32), noise, S)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_elementwise_in_input_dtype_reductions_in_float32(dtype):
    x0 = torch.randn(2, 3, 4).to(dtype)
    noise = torch.randn(2, 3, 4).to(dtype)
    t = torch.tensor([0, 50])
    assert F.q_sample(x0, t, noise, S).dtype == dtype
    mean, var, logvar = F.q_posterior(x0, x0, t, S)
    assert mean.dtype == var.dtype == logvar.dtype == dtype and var.shape == (2, 1, 1)
    losses = F.training_losses(torch.randn(2, 6, 4).to(dtype), x0, t, noise, S, mean_type="epsilon",
                               var_type="learned_range", loss_type="mse")
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(v.dtype == want and v.shape == (2,) for v in losses.values())
    step = F.p_sample_step(noise, x0, t, S, mean_type="epsilon", var_type="fixed_small", noise=noise)
    assert step["sample"].dtype == dtype


def test_low_precision_inputs_use_float32_tables():
    """abar at t = 0 is 0.9999: a bf16 table would round it to 1 and return x0 unchanged."""
    x0 = torch.full((1, 8), 0.5, dtype=torch.bfloat16)
    noise = torch.ones(1, 8, dtype=torch.bfloat16)
    x_t = F.q_sample(x0, 0, noise, S)
    assert not torch.equal(x_t, x0)


def test_empty_batch_gives_empty_results():
    x0 = torch.randn(0, 3, 4)
    t = torch.zeros(0, dtype=torch.int64)
    assert F.q_sample(x0, t, x0, S).shape == (0, 3, 4)
    out = F.training_losses(x0, x0, t, x0, S, mean_type="epsilon", var_type="fixed_small", loss_type="mse")
    assert out["loss"].shape == (0,)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: F.q_sample(x.long(), 1, x, S), TypeError, "x0"),
        (lambda x: F.q_sample(x, 1.5, x, S), TypeError, "t"),
        (lambda x: F.q_sample(x, torch.tensor([1.0, 2.0]), x, S), TypeError, "t"),
        (lambda x: F.q_sample(x, torch.tensor([1, 2, 3]), x, S), ValueError, "t"),
        (lambda x: F.q_sample(x, torch.tensor([[1, 2]]), x, S), ValueError, "t"),
        (lambda x: F.q_sample(x, 100, x, S), ValueError, r"t: expected timesteps in \[0, 100\)"),
        (lambda x: F.q_sample(x, torch.tensor([-1, 2]), x, S), ValueError, "t"),
        (lambda x: F.q_sample(x, 1, x[:, :1], S), ValueError, "noise"),
        (lambda x: F.q_sample(x, 1, x.half(), S), TypeError, "noise"),
        (lambda x: F.q_sample(x, 1, x, "linear"), TypeError, "schedule"),
        (lambda x: F.q_sample(x, 1, x.to("meta"), S), ValueError, "noise"),
        (lambda x: F.q_sample(x[0, 0, 0], 1, x[0, 0, 0], S), ValueError, "x0"),
        (lambda x: F.q_sample(x, 1, x, S, backend="tpu"), ValueError, "backend"),
        (lambda x: F.vb_terms_bpd(x, x, x, 1, S, mean_type="eps", var_type="fixed_small"), ValueError, "mean_type"),
        (lambda x: F.vb_terms_bpd(x, x, x, 1, S, mean_type="epsilon", var_type="small"), ValueError, "var_type"),
        (lambda x: F.vb_terms_bpd(x, x, x, 1, S, mean_type="epsilon", var_type="learned"), ValueError, "model_output"),
        (lambda x: F.training_losses(x, x, 1, x, S, mean_type="epsilon", var_type="fixed_small", loss_type="l1"),
         ValueError, "loss_type"),
        (lambda x: F.training_losses(x, x, 1, x, S, mean_type="epsilon", var_type="fixed_small", loss_type="mse",
                                     weighting="snr"), ValueError, "weighting"),
        (lambda x: F.p_sample_step(x, x, 1, S, mean_type="epsilon", var_type="fixed_small", dynamic_threshold=1.5),
         ValueError, "dynamic_threshold"),
        (lambda x: F.ddim_step(x, x, 1, S, eta=-1.0), ValueError, "eta"),
        (lambda x: F.ddim_step(x, x, 1, S, seed=-3), ValueError, "seed"),
        (lambda x: F.normal_kl(x, x[:, :1, :3], x, x), ValueError, "broadcast"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 3, 4))


def test_unavailable_backend_says_why():
    avail = F.availability()
    assert avail["reference"] == (True, "")
    for name, (ok, reason) in avail.items():
        if not ok:
            assert reason
            x = torch.randn(2, 3)
            with pytest.raises(F.BackendUnavailableError, match=name):
                F.q_sample(x, 1, x, S, backend=name)
