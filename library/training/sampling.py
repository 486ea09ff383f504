"""Sample images during training: prompt files, samplers and the generation loop.

Public API (stable):

- ``add_sampling_arguments(parser)``: ``--sample_every_n_steps``, ``--sample_every_n_epochs`` (wins over steps),
  ``--sample_at_first``, ``--sample_prompts``, ``--sample_sampler`` (default ddim).
- ``SamplePrompt``: one prompt with its options; ``load_sample_prompts(path) -> list[SamplePrompt]`` reads
  ``.txt`` (one prompt per line, ``#`` comments, ``--n --w --h --d --l --s --ss`` options), ``.toml``
  (``[prompt]`` defaults + ``[[prompt.subset]]``) or ``.json`` (a list of objects). Errors name the file and line
  (or entry) and are raised at load time, so a bad file fails before training starts.
- ``sampling_due(args, *, step, epoch=None) -> bool``: whether to sample at this step (``epoch`` given at the end
  of an epoch, ``step == 0`` before training).
- ``sample_tag(*, step, epoch=None) -> str``: ``"e000001"`` at an epoch end, else ``"000100"``.
- ``make_sample_scheduler(name, v_parameterization, zero_terminal_snr=False)``: the diffusers scheduler.
- ``generate_samples(*, unet, vae, text_encode, prompts, output_dir, output_name, tag, default_size, device,
  dtype, v_parameterization, latent_scale, sampler="ddim", zero_terminal_snr=False) -> list[Path]``.

Images go to ``output_dir/sample/<output_name>_<tag>_<idx:02d>_<YYYYmmddHHMMSS>[_<seed>].png``, written
atomically. The torch (CPU and CUDA), python ``random`` and numpy RNG states are restored afterwards, so
sampling does not change the training run's randomness. Prompts without a size use ``default_size`` (the
training resolution), not 512x512.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import logging
import random
import re
import time
import tomllib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library.errors import UserError
from library.io_utils import atomic_save_file
from library.models.families import SD_SCHEDULE

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
_SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}
_NEEDS = {"lms": ("scipy", "scipy==1.18.1")}
# prompt-file keys of other model families (ControlNet ...): accepted and ignored with a warning
_OTHER_MODEL_KEYS = {"controlnet_image", "flow_shift"}
# keys that only some families' samplers read (FamilySpec.sample_prompt_keys); the others say they ignore them
FAMILY_SAMPLE_KEYS = ("cfg_trunc_ratio", "renorm_cfg")
_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "sample_steps",
                "ss": "sample_sampler", "g": "guidance_scale", "cn": "controlnet_image", "ctr": "cfg_trunc_ratio",
                "rcfg": "renorm_cfg", "fs": "flow_shift"}
_KEYS = ("prompt", "negative_prompt", "width", "height", "seed", "scale", "sample_steps", "sample_sampler",
         "guidance_scale", *FAMILY_SAMPLE_KEYS)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sample-image options (sd-scripts names and defaults)."""
    g = parser.add_argument_group("sample images")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None,
                   help="generate sample images every N epochs (overrides --sample_every_n_steps)")
    g.add_argument("--sample_at_first", action="store_true", help="generate sample images before training")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    g.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLERS,
                   help="sampler (scheduler) for sample images (default ddim)")


def normalize_sampler(name: str) -> str:
    """``k_euler`` -> ``euler`` etc.; the names diffusers schedulers are chosen by."""
    name = name.lower()
    return name[2:] if name.startswith("k_") else name


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt. ``width``/``height``/``seed``/``sampler``/``guidance_scale`` are None when the file does
    not set them; ``given`` names the keys the file set (families with other defaults read it)."""

    prompt: str
    index: int = 0
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scale: float = 7.5
    sample_steps: int = 30
    sampler: str | None = None
    guidance_scale: float | None = None  # FLUX.1 dev's embedded guidance (--g)
    cfg_trunc_ratio: float | None = None  # Lumina (--ctr): guidance only while 1 - sigma < this
    renorm_cfg: float | None = None  # Lumina (--rcfg): cap of the guided velocity's norm, times the conditional's
    given: frozenset[str] = field(default=frozenset(), compare=False)

    def size(self, default_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height), from the prompt or ``default_size``, rounded down to a multiple of 8, at least 64."""
        w = self.width if self.width is not None else default_size[0]
        h = self.height if self.height is not None else default_size[1]
        return max(64, w - w % 8), max(64, h - h % 8)


def _typed(where: str, key: str, value: Any, kind: type, lo: float, hi: float) -> Any:
    """``value`` as ``kind`` (int or float, from a number or text) within [lo, hi], else a UserError."""
    out: Any = None
    if not isinstance(value, bool):
        try:
            if kind is float:
                out = float(value)
            elif isinstance(value, float):
                out = int(value) if value.is_integer() else None
            else:
                out = int(str(value).strip())
        except (TypeError, ValueError):
            out = None
    if out is None:
        raise UserError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not lo <= out <= hi:
        raise UserError(f"{where}: {key} must be between {lo} and {hi}, got {value!r}")
    return out


def prompt_from_dict(entry: dict[str, Any], index: int, where: str) -> SamplePrompt:
    """Build a :class:`SamplePrompt` from sd-scripts keys, checking names, types and ranges."""
    fields: dict[str, Any] = {"index": index}
    for key, value in entry.items():
        if key in _OTHER_MODEL_KEYS:
            logger.warning("%s: %s is not used for sample images here; ignored", where, key)
            continue
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS + tuple(_OTHER_MODEL_KEYS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(_KEYS)}")
        if key in ("prompt", "negative_prompt"):
            if not isinstance(value, str):
                raise UserError(f"{where}: {key} must be text, got {value!r}")
            fields[key] = value.strip()
        elif key in ("width", "height"):
            fields[key] = _typed(where, key, value, int, 8, 16384)
        elif key == "seed":
            fields[key] = _typed(where, key, value, int, 0, 2**63 - 1)
        elif key in ("scale", "guidance_scale"):
            fields[key] = _typed(where, key, value, float, 0, 1000)
        elif key == "cfg_trunc_ratio":
            fields[key] = _typed(where, key, value, float, 0, 1)
        elif key == "renorm_cfg":
            fields[key] = _typed(where, key, value, float, 0, 1000)
        elif key == "sample_steps":
            fields[key] = _typed(where, key, value, int, 1, 1000)
        elif key == "sample_sampler":
            name = str(value).lower()
            if name not in SAMPLERS:
                close = difflib.get_close_matches(name, SAMPLERS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"{where}: unknown sampler {value!r}{hint}; choices: {', '.join(SAMPLERS)}")
            fields["sampler"] = name
    if not fields.get("prompt"):
        raise UserError(f"{where}: the prompt is empty")
    return SamplePrompt(**fields, given=frozenset(k for k in entry if k in _KEYS))


_OPTION_RE = re.compile(r"^([a-z]+)(?:\s+(.*))?$", re.S | re.I)


def parse_prompt_line(line: str, index: int, where: str) -> SamplePrompt:
    """``prompt --n negative --w 512 --h 768 --d 1 --l 7.5 --s 28 --ss euler_a``."""
    parts = (" " + line if line.startswith("--") else line).split(" --")
    entry: dict[str, Any] = {"prompt": parts[0]}
    for part in parts[1:]:
        m = _OPTION_RE.match(part.strip())
        option = m.group(1).lower() if m else ""
        if option not in _TXT_OPTIONS:
            name = part.strip().split(" ")[0]
            close = difflib.get_close_matches(name, _TXT_OPTIONS, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"{where}: unknown option --{name}{hint}; known: "
                            + " ".join(f"--{k}" for k in _TXT_OPTIONS))
        value = (m.group(2) or "").strip()
        if value == "" and option != "n":
            raise UserError(f"{where}: option --{option} needs a value")
        entry[_TXT_OPTIONS[option]] = value
    return prompt_from_dict(entry, index, where)


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a prompt file (.txt, .toml, .json); every problem is a ``UserError`` naming file and line/entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--sample_prompts: file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    prompts: list[SamplePrompt] = []
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path}: invalid TOML: {err}") from None
        section = data.get("prompt")
        if not isinstance(section, dict) or not isinstance(section.get("subset"), list):
            raise UserError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
        defaults = {k: v for k, v in section.items() if k != "subset"}
        for i, subset in enumerate(section["subset"]):
            where = f"{path}: [[prompt.subset]] #{i + 1}"
            if not isinstance(subset, dict):
                raise UserError(f"{where}: expected a table with prompt = \"...\"")
            prompts.append(prompt_from_dict({**defaults, **subset}, len(prompts), where))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise UserError(f"{path}: expected a list of objects like {{\"prompt\": \"...\", \"width\": 512}}")
        for i, entry in enumerate(data):
            prompts.append(prompt_from_dict(entry, len(prompts), f"{path}: entry #{i + 1}"))
    elif suffix in (".txt", ""):
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(parse_prompt_line(line, len(prompts), f"{path}:{lineno}"))
    else:
        raise UserError(f"--sample_prompts {path}: unsupported file type {suffix!r}; use .txt, .toml or .json")
    if not prompts:
        raise UserError(f"{path}: no prompts found")
    return prompts


def validate_sampling_args(args: Any) -> list[SamplePrompt]:
    """Check the sampling options and load the prompt file (if sampling is enabled); returns the prompts."""
    every_steps = getattr(args, "sample_every_n_steps", None)
    every_epochs = getattr(args, "sample_every_n_epochs", None)
    for option, value in (("--sample_every_n_steps", every_steps), ("--sample_every_n_epochs", every_epochs)):
        if value is not None and value < 0:
            raise UserError(f"{option} must be a positive number of steps/epochs (0 turns it off), got {value}")
    enabled = every_steps or every_epochs or getattr(args, "sample_at_first", False)
    path = getattr(args, "sample_prompts", None)
    if not enabled:
        return []
    if not path:
        raise UserError("sample images are requested but --sample_prompts is missing; give a prompt file")
    prompts = load_sample_prompts(path)
    for name in {getattr(args, "sample_sampler", "ddim")} | {p.sampler for p in prompts if p.sampler}:
        check_sampler_available(name)
    return prompts


def warn_unread_prompt_keys(prompts: Sequence[SamplePrompt], read: Collection[str], family_name: str) -> list[str]:
    """Warn once about family-specific prompt keys (``FAMILY_SAMPLE_KEYS``) that this family's sampler does not
    read (``FamilySpec.sample_prompt_keys``); returns them."""
    unread = [k for k in FAMILY_SAMPLE_KEYS if k not in read and any(k in p.given for p in prompts)]
    if unread:
        logger.warning("--sample_prompts: %s %s not used by %s samples; ignored", ", ".join(unread),
                       "is" if len(unread) == 1 else "are", family_name)
    return unread


def sampling_due(args: Any, *, step: int, epoch: int | None = None) -> bool:
    """sd-scripts trigger rules: step 0 only with --sample_at_first; epochs win over steps when both are set."""
    if step == 0 and epoch is None:
        return bool(getattr(args, "sample_at_first", False))
    every_epochs = getattr(args, "sample_every_n_epochs", None)
    every_steps = getattr(args, "sample_every_n_steps", None)
    if every_epochs:
        return epoch is not None and epoch % every_epochs == 0
    if every_steps:
        return epoch is None and step % every_steps == 0
    return False


def sample_tag(*, step: int, epoch: int | None = None) -> str:
    return f"e{epoch:06d}" if epoch is not None else f"{step:06d}"


def check_sampler_available(name: str) -> None:
    needed = _NEEDS.get(normalize_sampler(name))
    if needed is not None:
        try:
            __import__(needed[0])
        except ImportError:
            raise UserError(f"sampler {name} needs the {needed[0]} package; install it with: pip install "
                            f"{needed[1]}, or choose another sampler (e.g. euler)") from None


def make_sample_scheduler(name: str, v_parameterization: bool, zero_terminal_snr: bool = False) -> Any:
    """A diffusers scheduler for ``name`` with the SD training schedule and the right prediction type."""
    import diffusers

    key = normalize_sampler(name)
    if key not in _SCHEDULER_CLASSES:
        raise UserError(f"unknown sampler {name!r}; choices: {', '.join(SAMPLERS)}")
    check_sampler_available(key)
    cls = getattr(diffusers, _SCHEDULER_CLASSES[key])
    wanted: dict[str, Any] = dict(
        **SD_SCHEDULE, prediction_type="v_prediction" if v_parameterization else "epsilon", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
    )
    if key in ("dpmsolver", "dpmsolver++"):
        wanted["algorithm_type"] = key
        if key == "dpmsolver":
            wanted["final_sigmas_type"] = "sigma_min"
    if zero_terminal_snr:
        wanted.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in wanted.items() if k in accepted})


@contextmanager
def preserved_rng_states(device: torch.device) -> Iterator[None]:
    """Restore torch (CPU and CUDA), python ``random`` and numpy RNG states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _as_conditioning(text: Any, spec: Any, size: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The denoiser's conditioning for one prompt's text output (SDXL: size ids from ``--w``/``--h``, no crop)."""
    if spec is None:
        return {"encoder_hidden_states": text.to(device)}
    width, height = size
    hw = torch.tensor([[height, width]])
    cond = spec.conditioning(text, {"original_sizes_hw": hw, "crop_top_lefts": torch.zeros_like(hw),
                                    "target_sizes_hw": hw}, device)
    return {k: v.to(device) for k, v in cond.items()}


def _denoise(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, cond: dict[str, torch.Tensor],
             uncond: dict[str, torch.Tensor] | None, scale: float, generator: torch.Generator,
             spec: Any = None) -> torch.Tensor:
    """The sampling loop; scheduler math in float32, the denoiser in its own dtype (``spec.forward`` when
    the family is given)."""
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    unet_dtype = next(unet.parameters()).dtype
    cond = {k: v.to(unet_dtype) for k, v in cond.items()}
    uncond = {k: v.to(unet_dtype) for k, v in uncond.items()} if uncond is not None else None
    batched = uncond is not None and all(uncond[k].shape == cond[k].shape for k in cond)

    def predict(x: torch.Tensor, t: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        if spec is not None:
            return spec.forward(unet, x, t, context, unet_dtype).float()
        return unet(x.to(unet_dtype), t, encoder_hidden_states=context["encoder_hidden_states"]).sample.float()

    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        if uncond is None:
            pred = predict(model_in, t, cond)
        else:
            if batched:
                both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                pred_u, pred_c = predict(torch.cat([model_in, model_in]), t, both).chunk(2)
            else:
                pred_u, pred_c = predict(model_in, t, uncond), predict(model_in, t, cond)
            pred = pred_u + scale * (pred_c - pred_u)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


def _to_pil(image: torch.Tensor) -> Any:
    from PIL import Image

    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def generate_samples(
    *, unet: torch.nn.Module, vae: torch.nn.Module, text_encode: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[SamplePrompt], output_dir: str | Path, output_name: str | None, tag: str,
    default_size: tuple[int, int], device: torch.device | str, dtype: torch.dtype, v_parameterization: bool,
    latent_scale: float, sampler: str = "ddim", zero_terminal_snr: bool = False, spec: Any = None,
) -> list[Path]:
    """Generate one image per prompt with classifier-free guidance and save it as PNG; returns the paths.

    ``text_encode(list_of_prompts) -> Tensor[B, seq, dim]`` (or a family's mapping) is the trainer's text
    encoding (long prompts and weights included); ``spec`` (a ``FamilySpec``) turns it into the denoiser's
    conditioning and calls the denoiser (SD1.x/2.x without it). ``dtype`` is the autocast dtype on CUDA.
    Models are put in eval mode and restored; RNG states are restored afterwards.
    """
    device = torch.device(device)
    folder = Path(output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{output_name}_" if output_name else ""
    use_autocast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    paths: list[Path] = []
    with preserved_rng_states(device), _eval_mode(unet, vae), torch.no_grad():
        for p in tqdm(prompts, desc="sample images", leave=False, disable=len(prompts) < 2):
            width, height = p.size(default_size)
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            generator = torch.Generator("cpu").manual_seed(seed)
            scheduler = make_sample_scheduler(p.sampler or sampler, v_parameterization, zero_terminal_snr)
            scheduler.set_timesteps(p.sample_steps, device=device)
            autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else nullcontext()
            with autocast:
                size = (width, height)
                cond = _as_conditioning(text_encode([p.prompt]), spec, size, device)
                uncond = (_as_conditioning(text_encode([p.negative_prompt]), spec, size, device)
                          if p.scale != 1.0 else None)
                shape = (1, vae.config.latent_channels, height // 8, width // 8)
                latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
                latents = latents * scheduler.init_noise_sigma
                latents = _denoise(unet, scheduler, latents, cond, uncond, p.scale, generator, spec)
                image = vae.decode(latents.to(next(vae.parameters()).dtype) / latent_scale).sample[0]
            paths.append(save_sample_image(image, folder, prefix, tag, p))
    return paths


def save_sample_image(image: torch.Tensor, folder: Path, prefix: str, tag: str, p: SamplePrompt) -> Path:
    """Write a decoded image (``[3, H, W]`` in [-1, 1]) as sd-scripts names samples:
    ``<name>_<tag>_<index>_<time>[_<seed>].png``, atomically."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    seed_suffix = f"_{p.seed}" if p.seed is not None else ""
    path = folder / f"{prefix}{tag}_{p.index:02d}_{stamp}{seed_suffix}.png"
    pil = _to_pil(image)
    atomic_save_file(path, lambda tmp: pil.save(tmp, format="PNG"))
    logger.info("sample image %s: %s", path.name, p.prompt)
    return path


def prompts_for_process(prompts: Sequence[SamplePrompt], process_index: int, num_processes: int) -> list[SamplePrompt]:
    """The share of ``prompts`` one process generates (indices keep the global numbering)."""
    return [p for i, p in enumerate(prompts) if i % num_processes == process_index]

