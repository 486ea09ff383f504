"""Samples during Lumina training: sd-scripts' Lumina sampler (flow-matching Euler on FlowMatchEulerDiscreteScheduler's
shift-6 schedule, classifier-free guidance only on the noisiest steps, with renormalisation), ``--sample_batch_size``
prompts at a time.

Per prompt (the shared prompt files of ``library.training.sampling``): ``--s`` steps, ``--l`` guidance scale with
``--n`` as the negative prompt (encoded without the system prompt, as sd-scripts does), ``--d`` seed, ``--w/--h``
size (multiples of the 16 px bucket step), and sd-scripts' Lumina keys ``--ctr`` (``cfg_trunc_ratio``: guidance runs
only while ``1 - sigma`` is below it, i.e. on the noisiest steps) and ``--rcfg`` (``renorm_cfg``: each guided
velocity's norm is capped at this many times the conditional one's; 0 turns the cap off). sd-scripts' defaults
apply when the file does not set them: 36 steps, scale 3.5, ``cfg_trunc_ratio`` 0.25, ``renorm_cfg`` 1.0. Prompts
that share size and these settings are denoised together, each from its own seed's noise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

SAMPLE_STEPS = 36
CFG_SCALE = 3.5
CFG_TRUNC_RATIO = 0.25
RENORM_CFG = 1.0


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0: diffusers' ``FlowMatchEulerDiscreteScheduler(shift)`` schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, renorm: float) -> torch.Tensor:
    """``v_u + scale (v_c - v_u)``, each sample's norm capped at ``renorm`` times ``v_c``'s (0: no cap)."""
    v = v_uncond + scale * (v_cond - v_uncond)
    if renorm > 0:
        dims = tuple(range(1, v.dim()))
        limit = torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True) * renorm
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        v = torch.where(norm >= limit, v * (limit / norm), v)
    return v


def euler_sample(predict: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                 sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate the flow from ``noise`` (sigma 1) to sigma 0; ``predict(x, sigma)`` is the velocity ``noise - x0``."""
    x = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (sigma_next - sigma) * predict(x, sigma).float()
    return x


def _settings(p: Any) -> tuple[int, float, float, float]:
    """(steps, scale, cfg_trunc_ratio, renorm_cfg) of a prompt, with sd-scripts' Lumina defaults."""
    given = getattr(p, "given", frozenset())  # the keys the prompt file set
    steps = p.sample_steps if "sample_steps" in given else SAMPLE_STEPS
    scale = p.scale if "scale" in given else CFG_SCALE
    trunc = p.cfg_trunc_ratio if getattr(p, "cfg_trunc_ratio", None) is not None else CFG_TRUNC_RATIO
    renorm = p.renorm_cfg if getattr(p, "renorm_cfg", None) is not None else RENORM_CFG
    return steps, scale, trunc, renorm


def batches(prompts: Sequence[Any], size: int, default_size: tuple[int, int], step: int) -> list[list[Any]]:
    """Consecutive prompts with the same size and settings (steps, scale, truncation, renorm), at most ``size`` per
    batch."""
    out: list[list[Any]] = []
    key_of = lambda p: (*(max(step, v - v % step) for v in p.size(default_size)), *_settings(p))  # noqa: E731
    for p in prompts:
        if out and len(out[-1]) < size and key_of(out[-1][0]) == key_of(p):
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _denoise_batch(run: Any, group: list[Any], default_size: tuple[int, int]) -> torch.Tensor:
    models, device = run.models, run.accelerator.device
    family, spec, encoding = models.family, models.family.spec, run.text.encoding
    width, height = (max(family.bucket_step, v - v % family.bucket_step) for v in group[0].size(default_size))
    steps, scale, trunc, renorm = _settings(group[0])
    seeds = [p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()) for p in group]
    shape = (1, models.vae.config.latent_channels, height // family.vae_factor, width // family.vae_factor)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]).to(device)
    cond = spec.conditioning(encoding.encode(encoding.tokenize([p.prompt for p in group]).to(device)), {}, device)
    uncond = None
    if scale != 1.0:
        ids = encoding.tokenize([p.negative_prompt for p in group], system=False).to(device)
        uncond = spec.conditioning(encoding.encode(ids), {}, device)
    dtype = next(models.unet.parameters()).dtype

    def predict(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), sigma * 1000, device=device)
        v = spec.forward(models.unet, x, t, cond, dtype).float()
        if uncond is None or 1 - sigma >= trunc:
            return v
        return guided(v, spec.forward(models.unet, x, t, uncond, dtype).float(), scale, renorm)

    latents = euler_sample(predict, noise, flow_sigmas(steps, family.scheduler_config["shift"]))
    latents = latents / family.latent_scale + family.latent_shift
    return models.vae.decode(latents.to(next(models.vae.parameters()).dtype)).sample


def generate_lumina_samples(run: Any, global_step: int, epoch: int | None) -> list[Path]:
    """Write this process's share of the sample prompts as PNGs, named like every sampler's
    (``<name>_<tag>_<index>_<time>[_<seed>].png`` in ``<output_dir>/sample``); RNG states are restored."""
    import time
    from contextlib import nullcontext

    from library.io_utils import atomic_save_file
    from library.training.sampling import _eval_mode, _to_pil, preserved_rng_states, prompts_for_process, sample_tag

    acc, args, models = run.accelerator, run.args, run.models
    prompts = prompts_for_process(run.sample_prompts, acc.process_index, acc.num_processes)
    folder = Path(args.output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    prefix, tag = (f"{run.names.name}_" if run.names.name else ""), sample_tag(step=global_step, epoch=epoch)
    size = args.sample_batch_size or args.train_batch_size or 1
    device = torch.device(acc.device)
    use_autocast = device.type == "cuda" and run.weight_dtype in (torch.float16, torch.bfloat16)
    run.recipe.before_forward({"network_multipliers": torch.ones(1)})  # samples show the full-strength LoRA
    if any(p.sampler for p in prompts):
        logger.warning("--ss is ignored for Lumina samples: they always use Euler steps on the flow (as sd-scripts)")
    paths = []
    with preserved_rng_states(device), _eval_mode(models.unet, models.vae), torch.no_grad():
        for group in batches(prompts, size, run.params.datasets[0].resolution, models.family.bucket_step):
            with torch.autocast(device.type, dtype=run.weight_dtype) if use_autocast else nullcontext():
                images = _denoise_batch(run, group, run.params.datasets[0].resolution)
            for p, image in zip(group, images):
                stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
                path = folder / f"{prefix}{tag}_{p.index:02d}_{stamp}{f'_{p.seed}' if p.seed is not None else ''}.png"
                pil = _to_pil(image)
                atomic_save_file(path, lambda tmp, img=pil: img.save(tmp, format="PNG"))
                paths.append(path)
    return paths
