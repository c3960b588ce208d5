"""The reference path against the mathematics, computed independently of its own code.

Everything here runs in float64 so that agreement is to ~1e-10, far below any formula error.
"""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import ddpm_fast as F

D = torch.float64
LN2 = math.log(2.0)
MEAN_TYPES = ("epsilon", "x0", "x_prev", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bins(shape, g):
    """x0 on the 256-bin grid of [-1, 1], as image data is."""
    return torch.randint(0, 256, shape, generator=g).to(D) / 127.5 - 1.0


# -- posterior: Bayes' rule -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_bayes_product_of_gaussians(name):
    """q(x_{t-1}|x_t,x0) is proportional to q(x_t|x_{t-1}) q(x_{t-1}|x0): precisions add, means weight."""
    T = 100
    s = F.NoiseSchedule.named(name, T)
    betas = np.asarray(s.betas)
    abar = np.cumprod(1 - betas)
    g = gen(1)
    B = 6
    t = torch.tensor([1, 2, 17, 50, 98, 99])
    x0 = torch.randn(B, 3, 2, generator=g, dtype=D)
    x_t = torch.randn(B, 3, 2, generator=g, dtype=D)
    mean, var, logvar = F.q_posterior(x0, x_t, t, s)
    for i, ti in enumerate(t.tolist()):
        a_t, b_t, ab_prev = 1 - betas[ti], betas[ti], abar[ti - 1]
        prec = a_t / b_t + 1 / (1 - ab_prev)  # from N(x_t; sqrt(a_t) x, b_t) and N(x; sqrt(ab_prev) x0, 1-ab_prev)
        m = (math.sqrt(a_t) / b_t * x_t[i] + math.sqrt(ab_prev) / (1 - ab_prev) * x0[i]) / prec
        torch.testing.assert_close(mean[i], m, rtol=1e-10, atol=1e-12)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
        assert logvar[i].item() == pytest.approx(math.log(1 / prec), rel=1e-10)


def test_posterior_by_numerical_integration():
    """For one scalar, the posterior's first two moments from densities on a grid."""
    s = F.NoiseSchedule.named("linear", 50)
    t, x0, x_t = 20, 0.3, -0.7
    a_t, b_t = 1 - s.betas[t].item(), s.betas[t].item()
    ab_prev = s.alphas_cumprod[t - 1].item()
    x = torch.linspace(-6, 6, 200001, dtype=D)
    dens = Normal(math.sqrt(a_t) * x, math.sqrt(b_t)).log_prob(torch.tensor(x_t, dtype=D)).exp() * Normal(
        math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)
    ).log_prob(x).exp()
    z = torch.trapezoid(dens, x)
    m = torch.trapezoid(x * dens, x) / z
    v = torch.trapezoid((x - m) ** 2 * dens, x) / z
    mean, var, _ = F.q_posterior(torch.full((1, 1), x0, dtype=D), torch.full((1, 1), x_t, dtype=D), t, s)
    assert mean.item() == pytest.approx(m.item(), abs=1e-8)
    assert var.item() == pytest.approx(v.item(), rel=1e-6)


def test_posterior_at_t0_is_the_data():
    s = F.NoiseSchedule.named("cosine", 10)
    x0, x_t = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    mean, var, logvar = F.q_posterior(x0, x_t, 0, s)
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert torch.all(var == 0)
    assert torch.all(logvar == math.log(s.posterior_variance[1].item()))  # the clipped log variance


# -- KL and the decoder likelihood ------------------------------------------------------------
def test_normal_kl_against_torch_distributions_and_monte_carlo():
    g = gen(2)
    m1, m2 = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    lv1, lv2 = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    ours = F.normal_kl(m1, lv1, m2, lv2)
    p, q = Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(ours, kl_divergence(p, q), rtol=1e-12, atol=1e-12)
    n = 400_000
    x = p.sample((n,))
    mc = (p.log_prob(x) - q.log_prob(x)).mean(0)
    se = (p.log_prob(x) - q.log_prob(x)).std(0) / math.sqrt(n)
    assert torch.all((mc - ours).abs() < 5 * se), (mc, ours, se)


def test_normal_kl_broadcasts_and_keeps_dtype():
    m1 = torch.zeros(2, 3, 4)
    out = F.normal_kl(m1, torch.zeros(2, 1, 1), torch.ones(1, 3, 1), torch.zeros(()))
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3, 4), 0.5))


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -1.0), (-0.99, -5.0), (1.0, 0.5), (0.2, -7.0)])
def test_discretized_likelihood_sums_to_one_over_the_bins(mean, log_scale):
    x = torch.arange(256, dtype=D) / 127.5 - 1.0
    ll = F.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    # The bins telescope to cdf(+inf) - cdf(-inf) = 1; each floored bin (p < 1e-12) adds at most 1e-12.
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=256e-12 + 1e-12)
    assert torch.all(ll <= 0)


def test_discretized_likelihood_matches_the_gaussian_bin_mass():
    """With a wide bin of a smooth Gaussian, the tanh cdf approximation is close to the exact one."""
    x = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=D)
    means = torch.tensor([-0.9, 0.0, 0.4, 0.95], dtype=D)
    log_scales = torch.full_like(x, math.log(0.05))
    ll = F.discretized_gaussian_log_likelihood(x, means, log_scales)
    n = Normal(means, log_scales.exp())
    hi = torch.where(x > 0.999, torch.ones_like(x), n.cdf(x + 1 / 255))
    lo = torch.where(x < -0.999, torch.zeros_like(x), n.cdf(x - 1 / 255))
    # The tanh approximation of the normal cdf is good to ~3e-4 absolute.
    torch.testing.assert_close(ll.exp(), hi - lo, rtol=0, atol=1e-3)


# -- the bound, assembled term by term ---------------------------------------------------------
def _fake_eps_model(x_t, t, noise):
    """A deterministic imperfect epsilon predictor."""
    return 0.8 * noise + 0.1 * torch.tanh(x_t) + 0.01 * t


def test_prior_plus_vb_terms_is_the_negative_elbo():
    """L_T + sum_t L_{t-1} + L_0 (bits/dim), each from torch.distributions, equals our vb terms' sum."""
    T = 12
    s = F.NoiseSchedule.named("cosine", T)
    g = gen(3)
    x0 = bins((2, 3, 4, 4), g)
    betas, abar = s.betas, s.alphas_cumprod
    ours = F.prior_bpd(x0, s)
    theirs = kl_divergence(Normal(abar[-1].sqrt() * x0, (1 - abar[-1]).sqrt()), Normal(0.0, 1.0)).mean((1, 2, 3)) / LN2
    for t in range(T):
        noise = torch.randn(x0.shape, generator=g, dtype=D)
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise
        eps = _fake_eps_model(x_t, t, noise)
        ours = ours + F.vb_terms_bpd(eps, x0, x_t, t, s, mean_type="epsilon", var_type="fixed_large")
        # The model: x0_hat from eps; mean = posterior mean at x0_hat; variance beta_t (post_var_1 at t = 0).
        x0_hat = (x_t - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        ab_prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=D)
        post_mean = (betas[t] * ab_prev.sqrt() * x0_hat + (1 - ab_prev) * (1 - betas[t]).sqrt() * x_t) / (1 - abar[t])
        var = betas[t] if t > 0 else betas[1] * (1 - abar[0]) / (1 - abar[1])
        model = Normal(post_mean, var.sqrt())
        if t > 0:
            q_mean = (betas[t] * ab_prev.sqrt() * x0 + (1 - ab_prev) * (1 - betas[t]).sqrt() * x_t) / (1 - abar[t])
            q_var = betas[t] * (1 - ab_prev) / (1 - abar[t])
            term = kl_divergence(Normal(q_mean, q_var.sqrt()), model)
        else:
            # L_0 = -log of the model's mass on x0's bin, with the tanh cdf approximation.
            def cdf(x):
                return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

            z_hi = (x0 + 1 / 255 - post_mean) / var.sqrt()
            z_lo = (x0 - 1 / 255 - post_mean) / var.sqrt()
            mass = torch.where(x0 > 0.999, 1 - cdf(z_lo), torch.where(x0 < -0.999, cdf(z_hi), cdf(z_hi) - cdf(z_lo)))
            term = -mass.clamp(min=1e-12).log()
        theirs = theirs + term.mean((1, 2, 3)) / LN2
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v", "x_prev"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_elbo_weight_turns_the_mse_into_the_kl(mean_type, var_type):
    """For a fixed model variance sigma_t^2: KL = const(t) + c_t ||target - out||^2 (the seeds' L_{t-1});
    const(t) = 0 when sigma_t^2 is the posterior's (fixed_small, t > 0)."""
    s = F.NoiseSchedule.named("linear", 200)
    g = gen(4)
    t = torch.tensor([1, 5, 60, 199])
    x0 = torch.randn(4, 2, 3, generator=g, dtype=D)
    noise = torch.randn(4, 2, 3, generator=g, dtype=D)
    x_t = F.q_sample(x0, t, noise, s)
    for trial in range(2):
        out = torch.randn(4, 2, 3, generator=g, dtype=D)
        vb = F.vb_terms_bpd(out, x0, x_t, t, s, mean_type=mean_type, var_type=var_type)
        loss = F.training_losses(out, x0, t, noise, s, mean_type=mean_type, var_type=var_type, loss_type="mse",
                                 weighting="elbo")["loss"]
        post_lv = s.posterior_log_variance_clipped[t]
        model_lv = post_lv if var_type == "fixed_small" else torch.log(s.betas[t])
        const = 0.5 * (-1 + model_lv - post_lv + torch.exp(post_lv - model_lv)) / LN2
        torch.testing.assert_close(vb - loss, const, rtol=1e-9, atol=1e-9)
    if var_type == "fixed_small":
        torch.testing.assert_close(vb, loss, rtol=1e-9, atol=1e-12)


def test_min_snr_weights():
    s = F.NoiseSchedule.named("linear", 1000)
    t = torch.tensor([0, 300, 999])
    snr = s.snr[t]
    g = gen(5)
    x0, noise, out = (torch.randn(3, 4, generator=g, dtype=D) for _ in range(3))
    for mean_type, w in [("epsilon", snr.clamp(max=5) / snr), ("x0", snr.clamp(max=5)), ("v", snr.clamp(max=5) / (snr + 1))]:
        terms = F.training_losses(out, x0, t, noise, s, mean_type=mean_type, var_type="fixed_small",
                                  loss_type="mse", weighting="min_snr", min_snr_gamma=5.0)
        torch.testing.assert_close(terms["loss"], w * terms["mse"], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="weighting"):
        F.training_losses(out, x0, t, noise, s, mean_type="x_prev", var_type="fixed_small", loss_type="mse",
                          weighting="min_snr")


# -- x0 predictions and the sampler conventions ---------------------------------------------------
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_perfect_model_recovers_x0(mean_type):
    """A model that outputs the exact target predicts x0 exactly, for every mean type."""
    s = F.NoiseSchedule.named("cosine", 100)
    g = gen(6)
    t = torch.tensor([0, 1, 50, 99])
    x0, noise = torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, 3, generator=g, dtype=D)
    x_t = F.q_sample(x0, t, noise, s)
    abar = s.alphas_cumprod[t][:, None]
    target = {
        "epsilon": noise,
        "x0": x0,
        "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
        "x_prev": F.q_posterior(x0, x_t, t, s)[0],
    }[mean_type]
    torch.testing.assert_close(F.predict_xstart(target, x_t, t, s, mean_type=mean_type), x0, rtol=1e-8, atol=1e-8)
    mse = F.training_losses(target, x0, t, noise, s, mean_type=mean_type, var_type="fixed_small", loss_type="mse")["mse"]
    assert torch.all(mse < 1e-20)


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_no_noise_is_added_at_t0(var_type):
    s = F.NoiseSchedule.named("linear", 100)
    g = gen(7)
    C = 6 if var_type.startswith("learned") else 3
    mo = torch.randn(2, C, 4, generator=g, dtype=D)
    x_t = torch.randn(2, 3, 4, generator=g, dtype=D)
    a = F.p_sample_step(mo, x_t, 0, s, mean_type="epsilon", var_type=var_type, noise=torch.randn(2, 3, 4, dtype=D))
    b = F.p_sample_step(mo, x_t, 0, s, mean_type="epsilon", var_type=var_type, noise=torch.zeros(2, 3, 4, dtype=D))
    assert torch.equal(a["sample"], b["sample"])
    c = F.p_sample_step(mo, x_t, 5, s, mean_type="epsilon", var_type=var_type, noise=torch.ones(2, 3, 4, dtype=D))
    d = F.p_sample_step(mo, x_t, 5, s, mean_type="epsilon", var_type=var_type, noise=torch.zeros(2, 3, 4, dtype=D))
    assert not torch.equal(c["sample"], d["sample"])
    e = F.ddim_step(mo[:, :3], x_t, 0, s, eta=1.0, noise=torch.randn(2, 3, 4, dtype=D))
    assert torch.equal(e["sample"], F.ddim_step(mo[:, :3], x_t, 0, s, eta=1.0, noise=torch.zeros(2, 3, 4, dtype=D))["sample"])


def test_vb_term_at_t0_is_the_decoder_nll():
    s = F.NoiseSchedule.named("linear", 100)
    g = gen(8)
    x0 = bins((3, 3, 2, 2), g)
    mo = torch.randn(3, 3, 2, 2, generator=g, dtype=D)
    x_t = F.q_sample(x0, 0, torch.randn(x0.shape, generator=g, dtype=D), s)
    vb = F.vb_terms_bpd(mo, x0, x_t, 0, s, mean_type="epsilon", var_type="fixed_small")
    pm = F.p_mean_variance(mo, x_t, 0, s, mean_type="epsilon", var_type="fixed_small")
    nll = -F.discretized_gaussian_log_likelihood(x0, pm["mean"], 0.5 * pm["log_variance"]).mean((1, 2, 3)) / LN2
    torch.testing.assert_close(vb, nll, rtol=1e-12, atol=0)
    kl = F.normal_kl(*F.q_posterior(x0, x_t, 0, s)[::2], pm["mean"], pm["log_variance"]).mean((1, 2, 3)) / LN2
    assert not torch.allclose(vb, kl)


def test_ddim_eta0_is_deterministic_and_respects_respacing():
    s = F.NoiseSchedule.named("linear", 1000).respace(range(0, 1000, 100))
    g = gen(9)
    x_t, eps = torch.randn(2, 3, generator=g, dtype=D), torch.randn(2, 3, generator=g, dtype=D)
    out = F.ddim_step(eps, x_t, 5, s, eta=0.0, clip_denoised=False)
    abar, abar_prev = s.alphas_cumprod[5], s.alphas_cumprod[4]
    assert abar_prev.item() == F.NoiseSchedule.named("linear", 1000).alphas_cumprod[400].item()
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(out["sample"], abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps, rtol=1e-10, atol=1e-10)


def test_dynamic_thresholding():
    s = F.NoiseSchedule.named("linear", 100)
    x_t = torch.zeros(2, 100, dtype=D)
    # x0 predicted by an x0 model is the output itself: sample 0 within [-1, 1], sample 1 spread to +-4.
    mo = torch.stack([torch.linspace(-0.5, 0.5, 100, dtype=D), torch.linspace(-4, 4, 100, dtype=D)])
    out = F.p_sample_step(mo, x_t, 10, s, mean_type="x0", var_type="fixed_small", dynamic_threshold=0.9,
                          sample_max_value=3.0, noise=torch.zeros(2, 100, dtype=D))
    torch.testing.assert_close(out["pred_xstart"][0], mo[0])  # quantile < 1: s = 1, nothing changes
    q = torch.quantile(mo[1].abs(), 0.9).clamp(1, 3)
    assert q.item() == 3.0
    torch.testing.assert_close(out["pred_xstart"][1], mo[1].clamp(-3, 3) / 3)


# -- gradients ------------------------------------------------------------------------------
def _req(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


def test_gradcheck_elementwise_ops():
    s = F.NoiseSchedule.named("linear", 50)
    g = gen(10)
    t = torch.tensor([0, 7, 49])
    x0, noise, x_t = (torch.randn(3, 2, 2, generator=g, dtype=D) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b: F.q_sample(a, t, b, s), _req(x0, noise))
    assert torch.autograd.gradcheck(lambda a, b: F.q_posterior(a, b, t, s)[0], _req(x0, x_t))
    m1, lv1, m2, lv2 = (torch.randn(4, generator=g, dtype=D) for _ in range(4))
    assert torch.autograd.gradcheck(F.normal_kl, _req(m1, lv1, m2, lv2))
    x = torch.tensor([-1.0, -0.5, 0.0, 0.7, 1.0], dtype=D)
    means, ls = torch.randn(5, generator=g, dtype=D) * 0.3, torch.randn(5, generator=g, dtype=D) * 0.3 - 1
    assert torch.autograd.gradcheck(lambda m, l: F.discretized_gaussian_log_likelihood(x, m, l), _req(means, ls))
    assert torch.autograd.gradcheck(lambda a: F.prior_bpd(a, s), _req(x0))


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_gradcheck_model_ops(mean_type, var_type):
    """t > 0 here; the t = 0 decoder term is checked below on data where no bin mass hits the 1e-12 floor."""
    s = F.NoiseSchedule.named("cosine", 50)
    g = gen(11)
    t = torch.tensor([1, 3, 49])
    learned = var_type.startswith("learned")
    mo = torch.randn(3, 4 if learned else 2, 2, generator=g, dtype=D) * 0.5
    x0, noise, x_t, z = (torch.randn(3, 2, 2, generator=g, dtype=D) for _ in range(4))
    kw = dict(mean_type=mean_type, var_type=var_type)
    assert torch.autograd.gradcheck(lambda m, a, b: F.vb_terms_bpd(m, a, b, t, s, **kw), _req(mo, x0, x_t))
    assert torch.autograd.gradcheck(lambda m, b: F.p_sample_step(m, b, t, s, clip_denoised=False, noise=z, **kw)["sample"],
                                    _req(mo, x_t))
    for loss_type in ("mse", "rescaled_mse", "kl", "rescaled_kl"):
        for weighting in ("simple", "elbo") if loss_type.endswith("mse") else ("simple",):
            def loss(m, a, n):
                return F.training_losses(m, a, t, n, s, loss_type=loss_type, weighting=weighting, **kw)["loss"]

            if learned and loss_type.endswith("mse"):
                # The hybrid loss stops the vb gradient at the mean half, so its autograd gradient is by design
                # not the derivative of the loss value: check it with the mean half held fixed.
                mean_half, var_half = mo[:, :2], mo[:, 2:]
                assert torch.autograd.gradcheck(lambda v, a, n: loss(torch.cat([mean_half, v], 1), a, n),
                                                _req(var_half, x0, noise))
            else:
                assert torch.autograd.gradcheck(loss, _req(mo, x0, noise))
    if mean_type != "x_prev":
        assert torch.autograd.gradcheck(
            lambda m, b: F.ddim_step(m, b, t, s, eta=0.5, clip_denoised=False, noise=z, **kw)["sample"], _req(mo, x_t)
        )


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_gradcheck_decoder_term(var_type):
    s = F.NoiseSchedule.named("linear", 50)
    g = gen(13)
    x0 = bins((2, 2, 3), g)
    noise = torch.randn(x0.shape, generator=g, dtype=D)
    x_t = F.q_sample(x0, 0, noise, s)
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=D)
    mo = torch.cat([eps, 0.5 * torch.randn(x0.shape, generator=g, dtype=D)], 1) if var_type.startswith("learned") else eps
    assert torch.autograd.gradcheck(
        lambda m: F.vb_terms_bpd(m, x0, x_t, 0, s, mean_type="epsilon", var_type=var_type), _req(mo)
    )


def test_hybrid_loss_stops_the_vb_gradient_at_the_mean():
    """Under mse + learned variance the vb term trains only the variance half."""
    s = F.NoiseSchedule.named("linear", 100)
    g = gen(12)
    t = torch.tensor([3, 50])
    mo = torch.randn(2, 4, 3, generator=g, dtype=D, requires_grad=True)
    x0, noise = torch.randn(2, 2, 3, generator=g, dtype=D), torch.randn(2, 2, 3, generator=g, dtype=D)
    terms = F.training_losses(mo, x0, t, noise, s, mean_type="epsilon", var_type="learned_range", loss_type="mse")
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), mo, retain_graph=True)
    assert torch.all(grad_vb[:, :2] == 0) and torch.any(grad_vb[:, 2:] != 0)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), mo)
    torch.testing.assert_close(grad_mse[:, :2], 2 * (mo[:, :2] - noise) / 6)
