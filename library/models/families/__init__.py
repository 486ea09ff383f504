"""Model families behind one seam: facts, objective and behaviour of each architecture (see
``docs/architecture.md``, "Adding a model family")."""

from library.models.families.base import (
    EPSILON, V_PREDICTION, Conditioning, FamilySpec, LoRABlockLayout, ModelFamily, Objective, objective_for,
)
from library.models.families.registry import FAMILY_SPECS, family_spec, resolve_family, spec_for_denoiser
from library.models.families.sd import SD_SCHEDULE, sd_family
from library.models.families.sdxl import sdxl_family

__all__ = ["EPSILON", "V_PREDICTION", "Conditioning", "FamilySpec", "LoRABlockLayout", "ModelFamily", "Objective",
           "objective_for", "FAMILY_SPECS", "family_spec", "resolve_family", "spec_for_denoiser", "SD_SCHEDULE",
           "sd_family", "sdxl_family"]
