"""Samples during SD3 training: the flow-matching Euler sampler SD3 ships with (diffusers'
``FlowMatchEulerDiscreteScheduler``, shift 3.0), classifier-free guidance with the prompt file's negative prompt
and scale, latents decoded with SD3's scale and shift. The prompt files are the shared ones
(``--sample_prompts``, ``library.training.sampling``); ``--sample_sampler`` does not apply (SD3 has one sampler)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.io_utils import atomic_save_file

SAMPLE_SHIFT = 3.0


def flow_euler(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor, steps: int,
               shift: float = SAMPLE_SHIFT) -> torch.Tensor:
    """Integrate ``dx/dsigma = v`` from sigma 1 to 0 with Euler steps on the shifted schedule; ``predict(x, t)``
    returns the velocity for ``t = 1000 * sigma``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        latents = scheduler.step(predict(latents, t.expand(latents.shape[0])), t, latents).prev_sample
    return latents


def generate_sd3_samples(*, models: Any, text_encode: Callable[[list[str]], Any], prompts: Sequence[Any],
                         folder: Path, prefix: str, tag: str, default_size: tuple[int, int], device: torch.device,
                         dtype: torch.dtype) -> list[Path]:
    """One PNG per prompt (CFG with the negative prompt when ``scale != 1``); returns the paths."""
    from library.training.sampling import _eval_mode, _to_pil

    spec, mmdit, vae = models.family.spec, models.unet, models.vae
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with _eval_mode(mmdit, vae):
        for p in prompts:
            width, height = (v - v % 16 for v in p.size(default_size))
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            generator = torch.Generator("cpu").manual_seed(seed)
            cond = spec.conditioning(text_encode([p.prompt]), {}, device)
            uncond = spec.conditioning(text_encode([p.negative_prompt]), {}, device) if p.scale != 1.0 else None

            def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                v = spec.forward(mmdit, x, t, cond, dtype).float()
                if uncond is None:
                    return v
                return spec.forward(mmdit, x, t, uncond, dtype).float() * (1 - p.scale) + v * p.scale

            noise = torch.randn((1, vae.config.latent_channels, height // 8, width // 8), generator=generator)
            latents = flow_euler(predict, noise.to(device), p.sample_steps)
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
            image = vae.decode(latents.to(next(vae.parameters()).dtype)).sample[0]
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            path = folder / f"{prefix}{tag}_{p.index:02d}_{stamp}{f'_{p.seed}' if p.seed is not None else ''}.png"
            pil = _to_pil(image)
            atomic_save_file(path, lambda tmp, img=pil: img.save(tmp, format="PNG"))
            paths.append(path)
    return paths


def sample_sd3(run: Any, global_step: int, epoch: int | None) -> list[Path]:
    """The recipes' ``sample``: each process renders its share of ``--sample_prompts``."""
    from library.training.sampling import preserved_rng_states, prompts_for_process, sample_tag

    acc = run.accelerator
    prompts = prompts_for_process(run.sample_prompts, acc.process_index, acc.num_processes)
    if not prompts:
        return []
    before = getattr(run.recipe, "before_forward", None)
    if before is not None:
        before({"network_multipliers": torch.ones(1)})  # samples show the full-strength LoRA
    with preserved_rng_states(acc.device), torch.no_grad():
        return generate_sd3_samples(
            models=run.models, text_encode=lambda texts: run.text.encode(texts, acc.device), prompts=prompts,
            folder=Path(run.args.output_dir) / "sample", prefix=f"{run.names.name}_" if run.names.name else "",
            tag=sample_tag(step=global_step, epoch=epoch), default_size=run.params.datasets[0].resolution,
            device=acc.device, dtype=run.weight_dtype)
