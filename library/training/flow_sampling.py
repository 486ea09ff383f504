"""Sample images of flow-matching models (FLUX.1 now; SD3 and Lumina can reuse it): Euler steps on the flow.

The schedule is sd-scripts' FLUX one: ``sample_steps + 1`` noise levels from 1 to 0, shifted by FLUX's
resolution-dependent ``mu`` (``flow_matching.flux_time_shift``, the same shift as ``--timestep_sampling
flux_shift``). Each step moves ``x`` by ``(sigma_next - sigma) * v`` where ``v`` is the model's velocity
(``noise - x0``) at ``timesteps = 1000 * sigma``. Prompt options are those of ``library.training.sampling``; for
FLUX the defaults are sd-scripts': 20 steps, ``--l`` (classifier-free guidance with the negative prompt) 1.0
(off), ``--g`` (dev's embedded guidance) 3.5. A ``guidance`` entry of the conditioning gets ``--g``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.training.flow_matching import flux_time_shift
from library.training.sampling import SamplePrompt, _eval_mode, preserved_rng_states, save_sample_image

logger = logging.getLogger(__name__)

FLOW_SAMPLE_STEPS = 20
FLOW_CFG_SCALE = 1.0
FLOW_GUIDANCE = 3.5


def flow_schedule(steps: int, image_seq_len: int, *, shift: bool = True) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 down to 0 (shifted for ``image_seq_len`` image tokens)."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        inner = flux_time_shift(sigmas[1:-1], image_seq_len)
        sigmas = torch.cat([sigmas[:1], inner, sigmas[-1:]])
    return sigmas.float()


def euler_flow(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate the flow from ``noise`` (sigma 1) to sigma 0; ``predict(x, sigma)`` returns the velocity."""
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = predict(x, torch.full((x.shape[0],), sigma, device=x.device))
        x = x + (sigma_next - sigma) * v.float()
    return x


def _conditioning(text: Any, spec: Any, guidance: float, device: torch.device) -> dict[str, torch.Tensor]:
    cond = spec.conditioning(text, {}, device)
    if "guidance" in cond:
        cond["guidance"] = torch.full_like(cond["guidance"], guidance)
    return cond


def generate_flow_samples(
    *, denoiser: torch.nn.Module, vae: torch.nn.Module, text_encode: Callable[[list[str]], Any],
    prompts: Sequence[SamplePrompt], output_dir: str | Path, output_name: str | None, tag: str,
    default_size: tuple[int, int], device: torch.device | str, dtype: torch.dtype, family: Any,
) -> list[Path]:
    """One image per prompt, saved as PNG like ``sampling.generate_samples`` (same names, RNGs restored)."""
    device = torch.device(device)
    spec, step = family.spec, family.bucket_step
    folder = Path(output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{output_name}_" if output_name else ""
    if any(p.sampler for p in prompts):
        logger.warning("--ss is ignored for %s samples: they always use Euler steps on the flow", family.name)
    use_autocast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    model_dtype = dtype if use_autocast else next(denoiser.parameters()).dtype
    paths = []
    with preserved_rng_states(device), _eval_mode(denoiser, vae), torch.no_grad():
        for p in prompts:
            width, height = (max(step, v - v % step) for v in p.size(default_size))
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            steps = p.sample_steps if "sample_steps" in p.given else FLOW_SAMPLE_STEPS
            scale = p.scale if "scale" in p.given else FLOW_CFG_SCALE
            guidance = p.guidance_scale if p.guidance_scale is not None else FLOW_GUIDANCE
            with torch.autocast(device.type, dtype=dtype) if use_autocast else nullcontext():
                cond = _conditioning(text_encode([p.prompt]), spec, guidance, device)
                uncond = (_conditioning(text_encode([p.negative_prompt]), spec, guidance, device)
                          if scale != 1.0 else None)
                shape = (1, vae.config.latent_channels, height // family.vae_factor, width // family.vae_factor)
                noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).to(device)

                def predict(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                    v = spec.forward(denoiser, x, sigma * 1000, cond, model_dtype).float()
                    if uncond is None:
                        return v
                    u = spec.forward(denoiser, x, sigma * 1000, uncond, model_dtype).float()
                    return u + scale * (v - u)

                sigmas = flow_schedule(steps, (shape[2] // 2) * (shape[3] // 2))
                latents = euler_flow(predict, noise, sigmas)
                latents = latents / family.latent_scale + family.latent_shift
                image = vae.decode(latents.to(next(vae.parameters()).dtype)).sample[0]
            paths.append(save_sample_image(image, folder, prefix, tag, p))
    return paths
