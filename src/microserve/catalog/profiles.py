"""Which of a model's profiles can run here, and which one to use.

Selection order, best first, among the compatible profiles:

1. device: ``nvidia`` before ``cpu`` (a GPU that fits the model serves it faster than the CPU);
2. the order of the profiles in the manifest (manifests list the preferred build of each device first).

A profile with ``auto_select: false`` (vLLM's CPU build, slower on a CPU than llama.cpp) is never chosen for the
machine; it runs only when forced.

A forced profile (``--profile``, ``MICROSERVE_PROFILE``, ``NIM_MODEL_PROFILE``) is used when compatible and is an
error otherwise: microserve never falls back silently from the profile an operator asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from microserve.catalog.errors import CatalogError
from microserve.catalog.manifest import Manifest, Profile
from microserve.engines.registry import engine_spec
from microserve.hardware import Hardware

_DEVICE_RANK = {"nvidia": 0, "cpu": 1}


class ProfileError(CatalogError):
    """No usable profile, or the forced one cannot run here."""


@dataclass(frozen=True, slots=True)
class ProfileCheck:
    """A profile with the verdict for this machine."""

    profile: Profile
    reasons: tuple[str, ...]

    @property
    def compatible(self) -> bool:
        """True when nothing rules the profile out."""
        return not self.reasons


def check_profile(profile: Profile, hardware: Hardware) -> ProfileCheck:
    """Every reason ``profile`` cannot run on ``hardware`` (none when it can)."""
    reasons: list[str] = []
    if profile.device == "nvidia":
        if not hardware.gpus:
            reasons.append("no NVIDIA GPU found (nvidia-smi/NVML absent or reports none)")
        else:
            best = max(hardware.gpus, key=lambda g: g.memory_free_mb)
            if best.memory_free_mb < profile.min_memory_mb:
                reasons.append(
                    f"needs {profile.min_memory_mb} MiB free GPU memory, the most free is {best.memory_free_mb} MiB"
                )
            wanted = profile.min_compute_capability
            capable = [g.compute_capability for g in hardware.gpus if g.compute_capability is not None]
            if wanted is not None and capable and max(capable) < wanted:
                reasons.append(f"needs compute capability {wanted}, the GPUs have at most {max(capable)}")
    else:
        if profile.min_memory_mb > hardware.memory_available_mb:
            reasons.append(f"needs {profile.min_memory_mb} MiB free RAM, {hardware.memory_available_mb} MiB available")
    missing = [flag for flag in profile.cpu_flags if flag not in hardware.cpu_flags]
    if missing:
        reasons.append(f"CPU lacks {', '.join(missing)}")
    unavailable = engine_spec(profile.engine).unavailable_on(profile.device)
    if unavailable is not None:
        reasons.append(unavailable)
    return ProfileCheck(profile, tuple(reasons))


def check_all(manifest: Manifest, hardware: Hardware) -> list[ProfileCheck]:
    """Every profile of ``manifest`` with its verdict, in selection order (best first)."""
    ranked = sorted(enumerate(manifest.profiles), key=lambda item: (_DEVICE_RANK[item[1].device], item[0]))
    return [check_profile(profile, hardware) for _, profile in ranked]


def select_profile(manifest: Manifest, hardware: Hardware, forced: str | None = None) -> Profile:
    """The profile to run ``manifest`` with: ``forced`` if given and compatible, else the best compatible one.

    Raises ``ProfileError`` naming the reasons when that is impossible.
    """
    checks = check_all(manifest, hardware)
    if forced:
        match = next((c for c in checks if c.profile.id == forced), None)
        if match is None:
            known = ", ".join(c.profile.id for c in checks)
            raise ProfileError(f"model {manifest.id} has no profile `{forced}` (profiles: {known})")
        if not match.compatible:
            raise ProfileError(
                f"profile `{forced}` of {manifest.id} cannot run on this machine: {'; '.join(match.reasons)}"
            )
        return match.profile
    for check in checks:
        if check.compatible and check.profile.auto_select:
            return check.profile
    details = "; ".join(f"{c.profile.id}: {', '.join(c.reasons)}" for c in checks)
    raise ProfileError(f"no profile of {manifest.id} can run on this machine ({details})")
