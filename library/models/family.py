"""Model families: the few facts about an architecture that the rest of the toolkit depends on.

A family is chosen from ``--v2`` / ``--v_parameterization`` (and checked against the checkpoint by the
loader). SDXL and later architectures plug in as new ``ModelFamily`` values with their own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """What trainers, datasets and metadata writers need to know about a model architecture."""

    name: str
    v2: bool
    v_parameterization: bool
    latent_scale: float
    bucket_step: int
    default_resolution: int
    base_model_version: str
    modelspec_architecture: str

    @property
    def prediction_type(self) -> str:
        """The diffusers scheduler ``prediction_type`` this family trains with."""
        return "v_prediction" if self.v_parameterization else "epsilon"


def sd_family(v2: bool = False, v_parameterization: bool = False) -> ModelFamily:
    """The SD1.x / SD2.x family for the ``--v2`` / ``--v_parameterization`` flags.

    ``--v_parameterization`` without ``--v2`` (v-prediction fine-tunes of SD1.x) keeps the SD1 numbers
    and changes the prediction type (and, as in sd-scripts, ``ss_base_model_version`` to ``sd_v1_v``).
    """
    if not v2:
        return ModelFamily(
            name="sd1",
            v2=False,
            v_parameterization=v_parameterization,
            latent_scale=0.18215,
            bucket_step=64,
            default_resolution=512,
            base_model_version="sd_v1_v" if v_parameterization else "sd_v1",
            modelspec_architecture="stable-diffusion-v1",
        )
    return ModelFamily(
        name="sd2",
        v2=True,
        v_parameterization=v_parameterization,
        latent_scale=0.18215,
        bucket_step=64,
        default_resolution=768 if v_parameterization else 512,
        base_model_version="sd_v2_v" if v_parameterization else "sd_v2",
        modelspec_architecture="stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512",
    )
