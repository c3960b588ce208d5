"""The public functional API: names, argument handling, dtypes, and clear errors."""
import inspect

import pytest
import torch

import ddpm_fast as F
from ddpm_fast import backends

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
        (lambda x: F.training_losses(x, x, torch.tensor([1, 2]), x, "linear"), TypeError, "schedule"),
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


# -- the registry and the one fallback policy (ddpm_fast.ops.REGISTRY, ddpm_fast.backends.route) ---------------
def test_every_export_comes_from_the_registry():
    from ddpm_fast import ops, traffic
    from ddpm_fast.bench import cases

    assert ops.__all__ == list(ops.REGISTRY) and set(ops.__all__) <= set(F.__all__)
    for name, spec in ops.REGISTRY.items():
        assert getattr(F, name) is spec.function is getattr(ops, name)
        assert spec.tensors and set(spec.tensors) <= set(inspect.signature(spec.function).parameters), name
        assert getattr(traffic, name) is spec.traffic, name
    assert {c.op for c in cases.CASES} <= set(ops.REGISTRY)
    with pytest.raises(AttributeError):
        traffic.nope  # noqa: B018


def test_every_op_declares_its_backends_in_one_place():
    """The compiled adapter of each op comes from its declaration with the reference op's parameters, and each
    backend module offers the op under its name (nothing listed a second time in native.py or triton/)."""
    from ddpm_fast import native, reference

    for name, spec in F.ops.REGISTRY.items():
        assert spec.compiled is not None, name
        adapter = list(inspect.signature(spec.compiled).parameters)
        assert adapter[0] == "kernel" and adapter[1:] == list(inspect.signature(getattr(reference, name)).parameters), name
        assert getattr(native.kernels, name).func is spec.compiled
        assert getattr(native, name).__wrapped__ is spec.compiled
        if spec.kernel_no_grad:
            assert backends.CAPABILITIES["cpu"].no_grad[name] == spec.kernel_no_grad
        else:
            assert name not in backends.CAPABILITIES["cpu"].no_grad
    with pytest.raises(AttributeError):
        native.nope  # noqa: B018


def _backends_here():
    return [name for name, (ok, _) in F.availability().items()
            if ok and name != "cuda" and not (name == "triton" and torch.cuda.is_available())]


GRAD_CASES = {  # an op, and the input that requires grad though the kernels have no gradient for it
    "training_losses x0": (lambda a, b: F.training_losses(a["mo"], a["x0"], a["t"], a["noise"], S,
                                                          var_type="learned_range", loss_type="kl", backend=b)["loss"],
                           "x0"),
    "vb_terms_bpd x_t": (lambda a, b: F.vb_terms_bpd(a["mo"], a["x0"], a["x_t"], a["t"], S, var_type="learned",
                                                     backend=b), "x_t"),
    "p_mean_variance model_output": (lambda a, b: F.p_mean_variance(a["mo"], a["x_t"], a["t"], S,
                                                                    var_type="learned_range", backend=b)["mean"],
                                     "mo"),
    "p_sample_step x_t": (lambda a, b: F.p_sample_step(a["mo"], a["x_t"], a["t"], S, var_type="learned_range",
                                                       noise=a["noise"], backend=b)["sample"], "x_t"),
    "ddim_step model_output": (lambda a, b: F.ddim_step(a["mo"], a["x_t"], a["t"], S, eta=0.5, var_type="learned",
                                                       noise=a["noise"], backend=b)["sample"], "mo"),
}


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_a_gradient_the_backend_lacks_runs_on_the_reference(backend, case):
    """Same results and the reference's gradient on every backend: never dropped, never an error."""
    call, grad_input = GRAD_CASES[case]
    g = torch.Generator().manual_seed(3)
    base = dict(x0=torch.rand(2, 3, 4, generator=g) * 2 - 1, noise=torch.randn(2, 3, 4, generator=g),
                x_t=torch.randn(2, 3, 4, generator=g), mo=torch.randn(2, 6, 4, generator=g) * 0.5,
                t=torch.tensor([0, 57]))
    grads = []
    for b in (backend, "reference"):
        a = {k: (v.clone().requires_grad_() if k == grad_input else v) for k, v in base.items()}
        out = call(a, b)
        (out.double() * torch.arange(1, out.numel() + 1).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), a[grad_input].grad))
    assert grads[0][1] is not None, f"{backend} dropped the gradient w.r.t. {grad_input}"
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_route_decides_from_the_capability_table():
    from ddpm_fast import backends

    if not backends.available("cpu"):
        pytest.skip("no compiled CPU extension here")
    from ddpm_fast import native, ops, reference

    plain, grad = torch.zeros(2, 3), torch.zeros(2, 3, requires_grad=True)

    def route(op, **tensors):  # the tensors in the registry's order
        return backends.route("cpu", "cpu", op, torch.float32, *[tensors.get(n) for n in ops.REGISTRY[op].tensors])

    assert route("training_losses", x0=plain, model_output=grad, noise=plain) == (native.kernels.training_losses, "")
    fn, why = route("training_losses", x0=grad, model_output=grad, noise=plain)
    assert fn is reference.training_losses and "x0, noise" in why
    assert route("ddim_step", x_t=plain, model_output=grad)[0] is reference.ddim_step
    with torch.no_grad():
        assert route("ddim_step", x_t=plain, model_output=grad)[0] is native.kernels.ddim_step
    assert any("float64" in rule for rule in backends.fallback_rules("cuda"))
    assert not backends.fallback_rules("reference")
