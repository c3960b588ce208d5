"""Graph-safe in-kernel noise (issue 18): seed=None / generator= draw the Philox seed as a device tensor.

p_sample_step / ddim_step with seed=None or generator= draw the step's Philox seed with torch.randint on the
generator's device and hand it to the kernel as `seed_key` (an int64 [1] tensor read in-kernel): no host read
of the generator, so a CUDA-graph capture of the step draws fresh noise on every replay. On the CPU this is
the same draw as before (the seed an int seed= would give), which these tests pin down; the capture itself is
tested on a GPU (last test, and `ddpm-fast selftest`'s graphs stage).
"""
from __future__ import annotations

import pytest
import torch

import ddpm_fast as F

SCHED = F.NoiseSchedule.named("linear", 100)
HERE = [name for name, (ok, _) in F.availability().items()
        if ok and name in ("cpu", "cuda_emu", "triton") and not (name == "triton" and torch.cuda.is_available())]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, 3, 5, 7, generator=g)
    eps = torch.randn(2, 3, 5, 7, generator=g)
    return eps, x_t, torch.tensor([40, 3])


def _steps(backend, **noise):
    eps, x_t, t = _inputs()
    ddpm = F.p_sample_step(eps, x_t, t, SCHED, backend=backend, **noise)["sample"]
    ddim = F.ddim_step(eps, x_t, t, SCHED, eta=0.7, backend=backend, **noise)["sample"]
    return ddpm, ddim


def _seed_drawn_by(generator):
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)[0])


@pytest.mark.parametrize("backend", HERE)
def test_a_generator_draws_the_seed_a_seed_argument_would_give(backend):
    """generator= runs the kernel on the seed torch.randint draws from it: the same noise as seed=<that draw>,
    and the generator advances exactly as by that one draw (two steps: two draws)."""
    g, g_copy = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    ddpm_gen, ddim_gen = _steps(backend, generator=g)
    ddpm_seed = _steps(backend, seed=_seed_drawn_by(g_copy))[0]
    ddim_seed = _steps(backend, seed=_seed_drawn_by(g_copy))[1]
    assert torch.equal(ddpm_gen, ddpm_seed) and torch.equal(ddim_gen, ddim_seed)
    assert torch.equal(g.get_state(), g_copy.get_state())


@pytest.mark.parametrize("backend", HERE)
def test_seed_none_draws_from_torch_default_generator(backend):
    torch.manual_seed(5)
    first = _steps(backend)[0]
    torch.manual_seed(5)
    again = _steps(backend)[0]
    torch.manual_seed(5)
    expected = _steps(backend, seed=_seed_drawn_by(None))[0]
    assert torch.equal(first, again) and torch.equal(first, expected)


def test_backends_agree_on_a_generator_draw():
    """Every backend reads the same seed from the same generator state, so the noise (and the sample) agree
    to float32 rounding across backends."""
    if len(HERE) < 2:
        pytest.skip(f"one kernel backend here ({HERE})")
    samples = [_steps(b, generator=torch.Generator().manual_seed(9))[0] for b in HERE]
    for b, s in zip(HERE[1:], samples[1:]):
        torch.testing.assert_close(s, samples[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{b} vs {HERE[0]}: {m}")


@pytest.mark.parametrize("backend", [b for b in HERE if b != "triton"])
def test_the_compiled_ops_read_seed_key_as_the_seed(backend):
    """The raw op: seed_key=[s] gives what seed=s gives; a malformed seed_key is a ValueError naming it."""
    ns = getattr(torch.ops, "ddpm_fast_emu" if backend == "cuda_emu" else "ddpm_fast")
    eps, x_t, t = _inputs(1)
    table = SCHED.table()
    by_int = ns.p_sample_step(eps, x_t, t, table, 0, 0, True, None, None, 987654321)
    by_key = ns.p_sample_step(eps, x_t, t, table, 0, 0, True, None, None, 0, torch.tensor([987654321]))
    assert torch.equal(by_int[0], by_key[0])
    ddim_int = ns.ddim_step(eps, x_t, t, table, 0, 0, True, None, 1.0, None, 42)
    ddim_key = ns.ddim_step(eps, x_t, t, table, 0, 0, True, None, 1.0, None, 7, torch.tensor([42]))
    assert torch.equal(ddim_int[0], ddim_key[0])
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor(3)):
        with pytest.raises(ValueError, match="seed_key"):
            ns.p_sample_step(eps, x_t, t, table, 0, 0, True, None, None, 0, bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_captured_step_draws_fresh_noise_on_every_replay(backend):
    ok, why = F.availability()[backend]
    if not ok:
        pytest.skip(why)
    eps, x_t, t = (a.cuda() for a in _inputs())
    gen = torch.Generator("cuda").manual_seed(3)
    step = lambda: F.p_sample_step(eps, x_t, t, SCHED, generator=gen, backend=backend)["sample"]  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)
