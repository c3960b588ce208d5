"""`ddpm-fast demo`: train a small diffusion model on sklearn's handwritten digits, end to end.

Data: sklearn.datasets.load_digits (1797 images, 8x8, 17 grey levels; ships with scikit-learn, no
download), scaled to [-1, 1], split into train and a held-out set. Model: a compact UNet
(ddpm_fast.demo_model) predicting eps and a learned-range variance, trained with improved-diffusion's
hybrid loss (rescaled MSE + vb) through the fused ops (ddpm_fast.diffusion). Outputs in --out-dir:
checkpoint.pt, metrics.json, bpd_curve.png (held-out bits/dim over training) and a sample grid per
--sampler (default ddpm,ddim): samples_ddpm.png (64 samples, p_sample_loop), samples_ddim.png (a 50-step
DDIM loop), samples_dpmsolver++.png / samples_euler.png / samples_euler_a.png / samples_unipc.png (a
--sampler-steps loop of the drop-in diffusers schedulers of ddpm_fast.compat.diffusers_solvers, built from
the same betas, T and epsilon prediction; the model's learned-variance half is not used), plus
samplers.md: a table of each sampler's steps, sample quality and seconds per sample.

Sample quality (nn_rms): the mean over samples of the RMS pixel distance (on [-1, 1]) to the nearest
held-out digit -- lower is closer to real digits; the same statistic of as many training digits is
printed as the "real digits" reference row.

The held-out negative log-likelihood is the full variational bound from calc_bpd_loop (all T terms
plus the prior term), in bits/dim on the 256-level discretisation of [-1, 1] that improved-diffusion
uses, over the demo's own --diffusion-steps process (default 100 steps: shorter than the usual 1000
to fit the time budget; a shorter process gives a looser bound).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch

from .bench.report import results_dir
from .diffusion import create_gaussian_diffusion
from .resample import UniformSampler


# --sampler: (title, drop-in scheduler class name in ddpm_fast.compat.diffusers_solvers, its config)
SAMPLERS = {
    "ddpm": ("p_sample_loop", None, None),
    "ddim": ("DDIM", None, None),
    "dpmsolver++": ("DPM-Solver++ 2M", "FastDPMSolverMultistepScheduler", {}),
    "euler": ("Euler", "FastEulerDiscreteScheduler", {}),
    "euler_a": ("Euler ancestral", "FastEulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPC bh2", "FastUniPCMultistepScheduler", {}),
}
# x0 clipped to [-1, 1] at every step, as p_sample_loop / ddim_sample_loop's clip_denoised (without it the
# cosine schedule's first sigma, about 2000 at T=100, blows the model's eps error up into the samples):
# DPM-Solver++ and UniPC by their thresholding with sample_max_value 1 (the threshold is then exactly 1);
# Euler has no such option, so the loop rewrites eps to the one whose x0 is the clipped x0.
CLIP_BY_THRESHOLDING = {"thresholding": True, "sample_max_value": 1.0}


def parse_samplers(spec: str) -> list:
    """--sampler's comma-separated names -> a list (each once, in order); SystemExit naming the option."""
    names = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [n for n in names if n not in SAMPLERS]
    if bad or not names:
        raise SystemExit(f"ddpm-fast demo: --sampler: unknown {bad or spec!r}; expected some of {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(names))


def diffusers_scheduler(name: str, diffusion):
    """The drop-in diffusers scheduler ``name`` over diffusion's own schedule: trained_betas = its betas,
    the same T, epsilon prediction (timesteps: 0-based integers into the same alphas_cumprod)."""
    try:
        from .compat import diffusers_solvers
    except ImportError as exc:
        raise SystemExit(f"ddpm-fast demo --sampler {name} needs diffusers: "
                         "pip install 'ddpm-fast[diffusers]'") from exc
    _, cls_name, config = SAMPLERS[name]
    cls = getattr(diffusers_solvers, cls_name)
    if name in ("dpmsolver++", "unipc"):
        config = {**config, **CLIP_BY_THRESHOLDING}
    return cls(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.tolist(),
               prediction_type="epsilon", **config)


def diffusers_sample_loop(scheduler, diffusion, model, shape, steps: int, generator: torch.Generator):
    """A diffusers-style sampling loop with an improved-diffusion model: [N, C, H, W] samples.

    The model sees each diffusers timestep as the diffusion's timestep (both index the same
    alphas_cumprod); of its [N, 2C, H, W] output (eps, learned variance) the eps half is used. x0 is
    clipped to [-1, 1] (see CLIP_BY_THRESHOLDING; for Euler here: x0 = x - sigma eps on its sample x)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    clip_eps = isinstance(scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler))
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    step_kwargs = {} if "generator" not in scheduler.step.__code__.co_varnames else {"generator": generator}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model_t = diffusion._scale_timesteps(t.expand(shape[0]))
            eps = model(scheduler.scale_model_input(x, t), model_t)[:, :shape[1]]
            if clip_eps:
                sigma = scheduler.sigmas[i]
                eps = (x - (x - sigma * eps).clamp(-1, 1)) / sigma
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def nn_rms(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples [N, ...] of the RMS pixel distance to the nearest image of reference [M, ...]."""
    a, b = samples.flatten(1).double().clamp(-1, 1), reference.flatten(1).double()
    return float((torch.cdist(a, b).min(dim=1).values / math.sqrt(a.shape[1])).mean())


def samplers_table(rows: list) -> str:
    """A markdown table of rows {sampler, title, steps, nn_rms, seconds_per_sample}."""
    lines = ["| sampler | steps | nn_rms (lower is better) | s / sample |", "|---|---:|---:|---:|"]
    for r in rows:
        sps = "" if r["seconds_per_sample"] is None else f"{r['seconds_per_sample']:.4f}"
        lines.append(f"| {r['title']} (`{r['sampler']}`) | {r['steps'] or ''} | {r['nn_rms']:.4f} | {sps} |")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default."""


def _parser():
    p = argparse.ArgumentParser(prog="ddpm-fast demo", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--steps", type=int, default=700, help="training steps (optimizer updates)")
    p.add_argument("--batch-size", type=int, default=64, help="training images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (linear warm-up over 100 steps)")
    p.add_argument("--channels", type=int, default=32, help="UNet width (base channel count)")
    p.add_argument("--diffusion-steps", type=int, default=100, help="T, the number of steps of the diffusion process")
    p.add_argument("--noise-schedule", default="cosine", choices=("cosine", "linear"), help="beta schedule")
    p.add_argument("--eval-points", type=int, default=5,
                   help="held-out bits/dim evaluations over training (the points of bpd_curve.png)")
    p.add_argument("--eval-images", type=int, default=64, help="held-out images per curve point")
    p.add_argument("--final-eval-images", type=int, default=0,
                   help="held-out images for the final NLL (0: all of the held-out set)")
    p.add_argument("--num-samples", type=int, default=64, help="images sampled by each sampler for the PNG grids")
    p.add_argument("--ddim-steps", type=int, default=50, help="steps of the DDIM sampling loop")
    p.add_argument("--sampler", default="ddpm,ddim",
                   help="comma-separated samplers whose grids to write: " + ", ".join(SAMPLERS))
    p.add_argument("--sampler-steps", type=int, default=25,
                   help="steps of the dpmsolver++, euler, euler_a and unipc loops")
    p.add_argument("--holdout", type=float, default=0.15, help="fraction of the digits held out for the NLL")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the training and the samples")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cpu", "cuda"),
                   help="ddpm_fast backend of the diffusion ops")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (8x8 images are too small to gain from more, and extra threads spin "
                        "when the cores are shared)")
    p.add_argument("--out-dir", default="demo-results",
                   help="output folder; a new one gets a .gitignore of its own, so git ignores it wherever it is")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_digits_split(holdout: float, seed: int):
    """(train [N, 1, 8, 8], held-out [M, 1, 8, 8]) float32 in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("ddpm-fast demo needs scikit-learn: pip install 'ddpm-fast[demo]'") from exc
    images = load_digits().images.astype(np.float32)  # 0..16
    x = torch.from_numpy(images / 16.0 * 2.0 - 1.0).unsqueeze(1)
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(x)))
    n_out = max(1, int(round(holdout * len(x))))
    return x[perm[n_out:]].contiguous(), x[perm[:n_out]].contiguous()


def heldout_bpd(diffusion, model, x, seed: int, batch: int = 512) -> float:
    """Mean held-out bits/dim (total bound incl. prior) with fixed noise (seeded)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    totals = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            totals.append(diffusion.calc_bpd_loop(model, x[i:i + batch], clip_denoised=True)["total_bpd"])
    model.train()
    torch.random.set_rng_state(state)
    return float(torch.cat(totals).mean())


def save_grid(images: torch.Tensor, path: pathlib.Path, title: str):
    """64 images [N, 1, 8, 8] in [-1, 1] as an 8-column grey grid PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ((images.clamp(-1, 1) + 1) / 2).squeeze(1).cpu().numpy()
    n = len(x)
    cols = 8
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * 9 + 1, cols * 9 + 1), dtype=np.float32)  # white gaps (gray_r: 0 is white)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = x[k]
    fig = plt.figure(figsize=(3.2, 3.5), dpi=100)
    plt.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    plt.title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def save_curve(curve, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4.5, 3), dpi=100)
    steps, bpd = zip(*curve)
    plt.plot(steps, bpd, "o-")
    plt.xlabel("training step")
    plt.ylabel("held-out NLL bound (bits/dim)")
    plt.title("ddpm-fast demo: sklearn digits", fontsize=9)
    plt.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name in ("steps", "batch_size", "diffusion_steps", "eval_points", "eval_images", "num_samples", "ddim_steps",
                 "sampler_steps"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise SystemExit(f"ddpm-fast demo: --{name.replace('_', '-')} must be positive")
    chosen = parse_samplers(args.sampler)
    from tqdm.auto import tqdm

    from .demo_model import DigitsUNet

    start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    out = results_dir(args.out_dir)
    torch.manual_seed(args.seed)
    train, held = load_digits_split(args.holdout, args.seed)
    diffusion = create_gaussian_diffusion(steps=args.diffusion_steps, learn_sigma=True, noise_schedule=args.noise_schedule,
                                          rescale_learned_sigmas=True, backend=args.backend)
    model = DigitsUNet(1, 2, channels=args.channels)
    ema = DigitsUNet(1, 2, channels=args.channels)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    sampler = UniformSampler(diffusion)
    curve_x = held[: args.eval_images]
    eval_at = sorted({int(round(k * args.steps / max(1, args.eval_points - 1))) for k in range(args.eval_points)})
    curve = []
    print(f"ddpm-fast demo: {len(train)} train / {len(held)} held-out digits, T={diffusion.num_timesteps} "
          f"({args.noise_schedule}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{args.steps} steps of batch {args.batch_size}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    bar = tqdm(range(args.steps + 1), disable=args.no_progress, desc="train", dynamic_ncols=True)
    loss_sum = None
    for step in bar:
        if step in eval_at:
            bpd = heldout_bpd(diffusion, ema, curve_x, seed=args.seed + 2)
            curve.append((step, bpd))
            bar.write(f"step {step}: held-out {bpd:.3f} bits/dim ({len(curve_x)} images)")
        if step == args.steps:
            break
        idx = torch.randint(0, len(train), (args.batch_size,), generator=gen)
        x0 = train[idx]
        t, weights = sampler.sample(args.batch_size, "cpu")
        losses = diffusion.training_losses(model, x0, t)
        loss = (losses["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if (step + 1) % 50 == 0:  # one host read every 50 steps
            bar.set_postfix(loss=f"{float(loss_sum) / 50:.4f}")
            loss_sum = None
    train_time = time.perf_counter() - start
    ckpt = out / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "args": vars(args), "curve": curve}, ckpt)

    final_x = held if args.final_eval_images <= 0 else held[: args.final_eval_images]
    t0 = time.perf_counter()
    final_bpd = heldout_bpd(diffusion, ema, final_x, seed=args.seed + 3)
    eval_time = time.perf_counter() - t0
    print(f"held-out NLL: {final_bpd:.3f} bits/dim (calc_bpd_loop, T={diffusion.num_timesteps}, prior term included, "
          f"{len(final_x)} images)")

    ema.eval()
    shape = (args.num_samples, 1, 8, 8)
    rows, grids = [], []
    torch.manual_seed(args.seed + 4)  # ddpm and ddim draw from it in turn (as before --sampler); the others
    for name in chosen:               # from a generator of their own, so their samples do not depend on the order
        scheduler = diffusers_scheduler(name, diffusion) if SAMPLERS[name][1] else None  # (imports diffusers)
        t0 = time.perf_counter()
        if name == "ddpm":
            samples, steps = diffusion.p_sample_loop(ema, shape, progress=not args.no_progress), diffusion.num_timesteps
            title = f"p_sample_loop, T={steps}"
        elif name == "ddim":
            ddim = create_gaussian_diffusion(steps=args.diffusion_steps, learn_sigma=True,
                                             noise_schedule=args.noise_schedule, rescale_learned_sigmas=True,
                                             timestep_respacing=str(args.ddim_steps), backend=args.backend)
            samples, steps = ddim.ddim_sample_loop(ema, shape, progress=not args.no_progress), ddim.num_timesteps
            title = f"DDIM, {steps} steps"
        else:
            gen = torch.Generator().manual_seed(args.seed + 4)
            samples = diffusers_sample_loop(scheduler, diffusion, ema, shape, args.sampler_steps, gen)
            steps = len(scheduler.timesteps)
            title = f"{SAMPLERS[name][0]}, {steps} steps"
        seconds = time.perf_counter() - t0
        grids.append(f"samples_{name}.png")
        save_grid(samples, out / grids[-1], title)
        rows.append({"sampler": name, "title": SAMPLERS[name][0], "steps": steps, "nn_rms": nn_rms(samples, held),
                     "seconds_per_sample": seconds / args.num_samples})
    real = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 5))[:args.num_samples]]
    rows.append({"sampler": "real", "title": "real digits (train)", "steps": None, "nn_rms": nn_rms(real, held),
                 "seconds_per_sample": None})
    markdown = samplers_table(rows)
    (out / "samplers.md").write_text(markdown + "\n")
    print(markdown)
    save_curve(curve, out / "bpd_curve.png")
    total = time.perf_counter() - start
    metrics = {
        "bpd_curve": curve, "heldout_bpd_initial": curve[0][1], "heldout_bpd_final": final_bpd,
        "heldout_images_final": len(final_x), "diffusion_steps": diffusion.num_timesteps, "train_steps": args.steps,
        "train_seconds": round(train_time, 1), "final_eval_seconds": round(eval_time, 1), "total_seconds": round(total, 1),
        "torch_threads": torch.get_num_threads(), "samplers": rows,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"bits/dim {curve[0][1]:.3f} (step 0) -> {final_bpd:.3f} (step {args.steps}); "
          f"{total:.0f} s in all; wrote {out}/checkpoint.pt, metrics.json, bpd_curve.png, samplers.md, "
          f"{', '.join(grids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
