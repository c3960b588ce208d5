"""Parity sweep: ddpm_fast's GaussianDiffusion / SpacedDiffusion against improved-diffusion's semantics.

improved-diffusion is not installed; its behaviour is restated here in float64 from its equations (the
oracle below: float64 numpy tables, respacing by kept alphas_cumprod, the model fed the original timestep,
optionally times 1000 / T; every method's output as improved-diffusion defines it, e.g. the fixed_small
variance is the posterior variance itself, 0 at t = 0). The oracle is tied to improved-diffusion's own
numbers by tests/test_diffusion.py's golden tests, which compare the same methods with shared/golden/.

Swept: every mean type x variance type, every loss type, respacing (none, "ddimN", section counts),
rescale_timesteps, clip_denoised, float32 / float16 / bfloat16, per-sample t holding the first, a middle and
the last step, and sampling loops of 1000 (p_sample_loop) and 50 (ddim_sample_loop on "ddim50") steps.

Rule (flash-attention, docs/design.md): the oracle in float64 is the truth; the oracle in float32 (how
improved-diffusion computes: float64 tables gathered to float32) is the parent's own error in float32; for
16-bit inputs the parent's error is its float32 result rounded once to the input dtype. Ours may be off by
at most twice that, plus a floor of one unit in the last place of the dtype at the output's scale.
"""
import math

import numpy as np
import pytest
import torch

from ddpm_fast.diffusion import GaussianDiffusion, SpacedDiffusion, get_named_beta_schedule, space_timesteps
from improved_diffusion_algebra import discretized_gaussian_log_likelihood as id_decoder_ll

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
MEANS = ("epsilon", "x0", "x_prev")
VARS = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSSES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


class Oracle:
    """improved-diffusion's GaussianDiffusion / SpacedDiffusion restated; ``d`` is the compute dtype."""

    def __init__(self, betas, use_timesteps, mean, var, rescale):
        betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(betas)
        self.timestep_map = list(range(len(betas)))
        if use_timesteps is not None:
            abar, last, new = np.cumprod(1.0 - betas), 1.0, []
            self.timestep_map = [i for i in range(len(betas)) if i in use_timesteps]
            for i in self.timestep_map:
                new.append(1.0 - abar[i] / last)
                last = abar[i]
            betas = np.array(new)
        self.mean, self.var, self.rescale, self.T = mean, var, rescale, len(betas)
        a = 1.0 - betas
        abar = np.cumprod(a)
        prev = np.append(1.0, abar[:-1])
        self.tab = {
            "betas": betas, "abar": abar, "abar_prev": prev, "abar_next": np.append(abar[1:], 0.0),
            "sqrt_abar": np.sqrt(abar), "sqrt_1m_abar": np.sqrt(1 - abar), "log_1m_abar": np.log(1 - abar),
            "sqrt_recip": np.sqrt(1 / abar), "sqrt_recipm1": np.sqrt(1 / abar - 1),
            "post_var": betas * (1 - prev) / (1 - abar),
            "c1": betas * np.sqrt(prev) / (1 - abar), "c2": (1 - prev) * np.sqrt(a) / (1 - abar),
        }
        pv = self.tab["post_var"]
        self.tab["post_logvar"] = np.log(np.append(pv[1], pv[1:]))
        self.tab["large"] = np.append(pv[1], betas[1:])
        self.tab["log_large"] = np.log(self.tab["large"])
        self.tab["log_betas"] = np.log(betas)
        self.tab["inv_c1"] = 1 / self.tab["c1"]
        self.tab["c2_c1"] = self.tab["c2"] / self.tab["c1"]

    def ex(self, name, t, x, d):
        return torch.from_numpy(self.tab[name])[t].to(d).reshape(-1, *([1] * (x.ndim - 1))).expand(x.shape)

    def model_t(self, t):
        m = torch.tensor(self.timestep_map)[t]
        return m.float() * (1000.0 / self.original_num_steps) if self.rescale else m

    def q_sample(self, x0, t, noise, d):
        return self.ex("sqrt_abar", t, x0, d) * x0.to(d) + self.ex("sqrt_1m_abar", t, x0, d) * noise.to(d)

    def q_posterior(self, x0, xt, t, d):
        mean = self.ex("c1", t, xt, d) * x0.to(d) + self.ex("c2", t, xt, d) * xt.to(d)
        return mean, self.ex("post_var", t, xt, d), self.ex("post_logvar", t, xt, d)

    def p_mean_variance(self, mo, x, t, clip, d):
        C = x.shape[1]
        mo, x = mo.to(d), x.to(d)
        if self.var in ("learned", "learned_range"):
            mo, v = mo[:, :C], mo[:, C:]
            if self.var == "learned":
                logvar = v
            else:
                frac = (v + 1) / 2
                logvar = frac * self.ex("log_betas", t, x, d) + (1 - frac) * self.ex("post_logvar", t, x, d)
            var = torch.exp(logvar)
        elif self.var == "fixed_large":
            var, logvar = self.ex("large", t, x, d), self.ex("log_large", t, x, d)
        else:
            var, logvar = self.ex("post_var", t, x, d), self.ex("post_logvar", t, x, d)
        if self.mean == "x_prev":
            pred = self.ex("inv_c1", t, x, d) * mo - self.ex("c2_c1", t, x, d) * x
        elif self.mean == "x0":
            pred = mo
        else:
            pred = self.ex("sqrt_recip", t, x, d) * x - self.ex("sqrt_recipm1", t, x, d) * mo
        if clip:
            pred = pred.clamp(-1, 1)
        mean = mo if self.mean == "x_prev" else self.q_posterior(pred, x, t, d)[0]
        return {"mean": mean, "variance": var, "log_variance": logvar, "pred_xstart": pred}

    def p_sample(self, mo, x, t, clip, z, d):
        out = self.p_mean_variance(mo, x, t, clip, d)
        nz = (t != 0).to(d).reshape(-1, *([1] * (x.ndim - 1)))
        return {"sample": out["mean"] + nz * torch.exp(0.5 * out["log_variance"]) * z.to(d),
                "pred_xstart": out["pred_xstart"]}

    def eps_from_x0(self, x, t, pred, d):
        return (self.ex("sqrt_recip", t, x, d) * x.to(d) - pred) / self.ex("sqrt_recipm1", t, x, d)

    def ddim_sample(self, mo, x, t, clip, eta, z, d):
        out = self.p_mean_variance(mo, x, t, clip, d)
        eps = self.eps_from_x0(x, t, out["pred_xstart"], d)
        ab, abp = self.ex("abar", t, x, d), self.ex("abar_prev", t, x, d)
        sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        mean = out["pred_xstart"] * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma**2) * eps
        nz = (t != 0).to(d).reshape(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + nz * sigma * z.to(d), "pred_xstart": out["pred_xstart"]}

    def ddim_reverse(self, mo, x, t, clip, d):
        out = self.p_mean_variance(mo, x, t, clip, d)
        eps = self.eps_from_x0(x, t, out["pred_xstart"], d)
        abn = self.ex("abar_next", t, x, d)
        return {"sample": out["pred_xstart"] * torch.sqrt(abn) + torch.sqrt(1 - abn) * eps,
                "pred_xstart": out["pred_xstart"]}

    @staticmethod
    def _kl(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))

    def vb(self, mo, x0, xt, t, clip, d):
        tm, _, tlv = self.q_posterior(x0, xt, t, d)
        out = self.p_mean_variance(mo, xt, t, clip, d)
        kl = self._kl(tm, tlv, out["mean"], out["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        nll = -id_decoder_ll(x0.to(d), out["mean"], 0.5 * out["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, mo, x0, t, noise, loss, d):
        xt = self.q_sample(x0, t, noise, d)
        if loss in ("kl", "rescaled_kl"):
            out = self.vb(mo, x0, xt, t, False, d)
            return {"loss": out * (self.T if loss == "rescaled_kl" else 1)}
        C = x0.shape[1]
        terms = {}
        if self.var in ("learned", "learned_range"):
            terms["vb"] = self.vb(mo, x0, xt, t, False, d) * (self.T / 1000.0 if loss == "rescaled_mse" else 1)
        target = {"x_prev": self.q_posterior(x0, xt, t, d)[0], "x0": x0.to(d), "epsilon": noise.to(d)}[self.mean]
        terms["mse"] = ((target - mo.to(d)[:, :C]) ** 2).flatten(1).mean(1)
        terms["loss"] = terms["mse"] + terms.get("vb", 0)
        return terms


def check(ours, parent32, gold, dtype, what):
    """parent32: the oracle's float32 result; for 16-bit inputs its error is that result rounded once to dtype."""
    gold = gold.double()
    parent = parent32 if dtype == torch.float32 or ours.dtype == torch.float32 else parent32.to(dtype)
    err_ours = (ours.double() - gold).abs().max().item()
    err_parent = (parent.double() - gold).abs().max().item()
    floor = FLOOR[dtype] * max(gold.abs().max().item(), 1.0)
    assert err_ours <= 2 * err_parent + floor, f"{what}: error {err_ours:.3g} vs parent {err_parent:.3g}"


def build(mean, var, loss, spacing, rescale, T=100, schedule="cosine"):
    betas = get_named_beta_schedule(schedule, T)
    kw = dict(betas=betas, model_mean_type=mean, model_var_type=var, loss_type=loss, rescale_timesteps=rescale)
    if spacing is None:
        return GaussianDiffusion(**kw), Oracle(betas, None, mean, var, rescale)
    use = space_timesteps(T, spacing)
    return SpacedDiffusion(use_timesteps=use, **kw), Oracle(betas, use, mean, var, rescale)


class Fixed(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, []

    def forward(self, x, t, **kw):
        self.seen.append(t)
        return self.out


def inputs(var, gen, B=3, C=2):
    x0 = (torch.rand(B, C, 4, 4, generator=gen) * 2 - 1).clamp(-1, 1)
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the decoder's edge bins
    mo = torch.randn(B, 2 * C if var.startswith("learned") else C, 4, 4, generator=gen)
    if var == "learned":
        mo[:, C:] = mo[:, C:] * 0.5 - 6.0  # log variances of a plausible size
    if var == "learned_range":
        mo[:, C:] = torch.tanh(mo[:, C:])
    return x0, torch.randn(B, C, 4, 4, generator=gen), torch.randn(B, C, 4, 4, generator=gen), mo


SPACINGS = (None, "ddim10", "10,5,3")


def test_methods_sweep():
    """Every mean x variance type; loss types, spacings, rescale_timesteps and clipping rotate; every dtype;
    t = (first, middle, last) step per sample."""
    gen = torch.Generator().manual_seed(0)
    for i, (mean, var) in enumerate((m, v) for m in MEANS for v in VARS):
        spacing, rescale, clip = SPACINGS[i % 3], bool(i % 2), bool((i // 2) % 2)
        for loss in LOSSES:
            ours, orc = build(mean, var, loss, spacing, rescale)
            x0, noise, z, mo = inputs(var, gen)
            t = torch.tensor([0, orc.T // 2, orc.T - 1])
            model = Fixed(mo)
            for dtype in DTYPES:
                what = f"{mean} {var} {loss} {spacing} rescale={rescale} clip={clip} {dtype}"
                x0d, nd, zd, mod = x0.to(dtype), noise.to(dtype), z.to(dtype), mo.to(dtype)
                run = {d: orc for d in (torch.float32, torch.float64)}
                terms = ours.training_losses(Fixed(mod), x0d, t, noise=nd)
                ref = {d: run[d].training_losses(mod, x0d, t, nd, loss, d) for d in run}
                assert set(terms) == set(ref[torch.float64]), what
                for k in terms:
                    check(terms[k], ref[torch.float32][k], ref[torch.float64][k], dtype, f"{what} loss {k}")
                if loss != "mse":
                    continue  # the sampling-side methods do not depend on the loss type
                xt = ours.q_sample(x0d, t, noise=nd)
                check(xt, orc.q_sample(x0d, t, nd, torch.float32), orc.q_sample(x0d, t, nd, torch.float64), dtype,
                      what + " q_sample")
                xt = xt.to(dtype)
                for name, a, r32, r64 in (
                        ("q_posterior", ours.q_posterior_mean_variance(x0d, xt, t),
                         orc.q_posterior(x0d, xt, t, torch.float32), orc.q_posterior(x0d, xt, t, torch.float64)),
                        ("q_mean_variance", ours.q_mean_variance(x0d, t),
                         *[(orc.ex("sqrt_abar", t, x0d, d) * x0d.to(d), 1 - orc.ex("abar", t, x0d, d),
                            orc.ex("log_1m_abar", t, x0d, d)) for d in (torch.float32, torch.float64)])):
                    for j in range(3):
                        assert a[j].shape == x0d.shape, f"{what} {name}[{j}] shape"
                        check(a[j], r32[j], r64[j], dtype, f"{what} {name}[{j}]")
                pmv = ours.p_mean_variance(model if dtype == torch.float32 else Fixed(mod), xt, t, clip_denoised=clip)
                r = {d: orc.p_mean_variance(mod, xt, t, clip, d) for d in run}
                for k in ("mean", "variance", "log_variance", "pred_xstart"):
                    assert pmv[k].shape == xt.shape, f"{what} p_mean_variance {k} shape"
                    check(pmv[k], r[torch.float32][k], r[torch.float64][k], dtype, f"{what} p_mean_variance {k}")
                for name, a, r32, r64 in (
                        ("p_sample", ours.p_sample(Fixed(mod), xt, t, clip_denoised=clip, noise=zd),
                         *[orc.p_sample(mod, xt, t, clip, zd, d) for d in run.keys()]),
                        ("ddim_sample", ours.ddim_sample(Fixed(mod), xt, t, clip_denoised=clip, eta=0.7, noise=zd),
                         *[orc.ddim_sample(mod, xt, t, clip, 0.7, zd, d) for d in run.keys()]),
                        ("ddim_reverse_sample", ours.ddim_reverse_sample(Fixed(mod), xt, t, clip_denoised=clip),
                         *[orc.ddim_reverse(mod, xt, t, clip, d) for d in run.keys()])):
                    for k in ("sample", "pred_xstart"):
                        check(a[k], r32[k], r64[k], dtype, f"{what} {name} {k}")
                for name, a, fn in (("_predict_xstart_from_eps", ours._predict_xstart_from_eps, "sqrt_recip"),
                                    ("_predict_xstart_from_xprev", ours._predict_xstart_from_xprev, "inv_c1")):
                    m = mod[:, :x0.shape[1]]
                    other = "sqrt_recipm1" if fn == "sqrt_recip" else "c2_c1"
                    r32, r64 = (orc.ex(fn, t, xt, d) * (m if fn == "inv_c1" else xt).to(d)
                                - orc.ex(other, t, xt, d) * (xt if fn == "inv_c1" else m).to(d)
                                for d in (torch.float32, torch.float64))
                    check(a(xt, t, m), r32, r64, dtype, f"{what} {name}")
                vb = ours._vb_terms_bpd(Fixed(mod), x0d, xt, t, clip_denoised=clip)["output"]
                check(vb, orc.vb(mod, x0d, xt, t, clip, torch.float32), orc.vb(mod, x0d, xt, t, clip, torch.float64),
                      dtype, what + " vb_terms_bpd")
                # the model sees the original timestep, rescaled to 1000 / T when asked
                seen = Fixed(mod)
                ours.p_sample(seen, xt, t, clip_denoised=clip, noise=zd)
                torch.testing.assert_close(seen.seen[-1], orc.model_t(t), rtol=0, atol=0)


def test_fixed_small_variance_is_the_posterior_variance():
    """improved-diffusion's p_mean_variance returns the unclipped posterior variance for fixed_small: 0 at
    t = 0 (its log is the clipped one). A difference the issue found, fixed."""
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type="epsilon",
                          model_var_type="fixed_small", loss_type="mse")
    x = torch.randn(2, 3, 4, 4)
    out = d.p_mean_variance(Fixed(torch.zeros_like(x)), x, torch.tensor([0, 1]))
    assert (out["variance"][0] == 0).all()
    assert torch.isfinite(out["log_variance"]).all()
    torch.testing.assert_close(out["variance"][1], torch.exp(out["log_variance"][1]), rtol=1e-6, atol=0)


class SmoothModel(torch.nn.Module):
    """A deterministic stand-in for a network: a smooth function of x and the (model) timestep."""

    def __init__(self, learned):
        super().__init__()
        self.learned = learned
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **kw):
        s = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
        eps = torch.tanh(x * (0.3 + s))
        return torch.cat([eps, torch.tanh(x - s)], 1).to(x.dtype) if self.learned else eps.to(x.dtype)


def _oracle_loop(orc, model, noise, zs, d, ddim, clip=True):
    x = noise.to(d)
    for k, i in enumerate(range(orc.T - 1, -1, -1)):
        t = torch.full((x.shape[0],), i, dtype=torch.int64)
        mo = model(x.float(), orc.model_t(t)).to(d)
        out = orc.ddim_sample(mo, x, t, clip, 0.0, zs[k], d) if ddim else orc.p_sample(mo, x, t, clip, zs[k], d)
        x = out["sample"]
    return x


@pytest.mark.parametrize("case", ("p_sample_loop-1000-linear-learned_range", "ddim_sample_loop-ddim50-cosine"))
def test_sampling_loops(monkeypatch, case):
    """Full loops: 1000 ancestral steps (learned_range, the improved-diffusion default) and 50 DDIM steps
    (eta = 0) of a respaced cosine process; float32 final sample by the flash-attention rule."""
    ddim = case.startswith("ddim")
    T, schedule, var = (1000, "cosine", "fixed_small") if ddim else (1000, "linear", "learned_range")
    ours, orc = build("epsilon", var, "mse", "ddim50" if ddim else None, False, T=T, schedule=schedule)
    model = SmoothModel(var.startswith("learned"))
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    zs = torch.randn(orc.T, 2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    it = iter(zs)
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: next(it).to(x.dtype))  # the loops' per-step draws
    loop = ours.ddim_sample_loop if ddim else ours.p_sample_loop
    mine = loop(model, (2, 2, 4, 4), noise=noise)
    check(mine, _oracle_loop(orc, model, noise, zs, torch.float32, ddim),
          _oracle_loop(orc, model, noise, zs, torch.float64, ddim), torch.float32, case)
