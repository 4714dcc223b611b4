"""Contrast transfer function exactly as RELION computes it (``CTF::getCTF``).

See :mod:`hetero.physics.conventions` for the formula. Everything is evaluated in float32 (or
float64 if the inputs are float64), also under autocast.

Example usage::

    ctf = compute_ctf(
        box_size=128, pixel_size_angstrom=1.5,
        defocus_u_angstrom=df_u, defocus_v_angstrom=df_v, defocus_angle_deg=ang,  # (B,)
        voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1,
    )                                                    # (B, 128, 128), centred spectrum
    images = ifft2_centered(fft2_centered(projections) * ctf).real
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from hetero.physics.conventions import RELATIVISTIC_CORRECTION, WAVELENGTH_PREFACTOR
from hetero.physics.fourier import frequency_grid_2d


def _as(x, ref: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        # Python/numpy numbers go straight to the working dtype: a detour through torch's
        # default float32 would round them (e.g. Q = 0.1) before a float64 evaluation.
        return torch.as_tensor(x, device=ref.device, dtype=ref.dtype)
    t = x.to(ref.device)
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


def ctf_from_frequencies(
    sx: Tensor,
    sy: Tensor,
    defocus_u_angstrom: Tensor | float,
    defocus_v_angstrom: Tensor | float,
    defocus_angle_deg: Tensor | float,
    voltage_kv: Tensor | float,
    spherical_aberration_mm: Tensor | float,
    amplitude_contrast: Tensor | float,
    phase_shift_deg: Tensor | float = 0.0,
    b_factor: Tensor | float = 0.0,
    scale: Tensor | float = 1.0,
) -> Tensor:
    """RELION CTF at arbitrary frequencies.

    :param sx, sy: frequency coordinates in 1/Å, any shape ``S`` (e.g. ``(D, D)``).
    :param defocus_*: per-particle parameters, scalars or ``(B,)`` tensors; Å, Å, degrees.
    :param voltage_kv, spherical_aberration_mm, amplitude_contrast: optics, scalars or ``(B,)``.
    :param phase_shift_deg: phase-plate shift in degrees. :param b_factor: envelope in Å^2.
    :param scale: CTF scale factor (``rlnCtfScalefactor``).
    :return: ``(B, *S)`` if any parameter is batched, else ``S``.
    """
    ref = sx if sx.dtype == torch.float64 else sx.float()
    params = _params_like(
        ref, defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, voltage_kv,
        spherical_aberration_mm, amplitude_contrast, phase_shift_deg, b_factor, scale,
    )
    batched = any(p.dim() > 0 for p in params)
    expand = (...,) + (None,) * ref.dim()
    ctf = _relion_ctf(ref, sy.to(ref.dtype), [p[expand] if p.dim() > 0 else p for p in params])
    if batched and ctf.dim() == ref.dim():
        ctf = ctf[None]
    return ctf


def _params_like(ref: Tensor, *values) -> list[Tensor]:
    """CTF parameters as tensors on ``ref``'s device in ``ref``'s (float32/float64) dtype."""
    return [_as(v, ref).to(ref.dtype) for v in values]


def _relion_ctf(sx: Tensor, sy: Tensor, params: list[Tensor]) -> Tensor:
    """The formula of :mod:`hetero.physics.conventions`; ``params`` broadcast against ``sx``."""
    du, dv, ang, kv, cs, w, ps, bf, sc = params
    volts = kv * 1e3
    lam = WAVELENGTH_PREFACTOR / torch.sqrt(volts * (1.0 + volts * RELATIVISTIC_CORRECTION))
    s2 = sx**2 + sy**2
    alpha = torch.atan2(sy, sx)
    deltaf = -0.5 * (du + dv) - 0.5 * (du - dv) * torch.cos(2 * (alpha - torch.deg2rad(ang)))
    k1 = torch.pi * lam
    k2 = torch.pi / 2 * (cs * 1e7) * lam**3
    k3 = torch.atan(w / torch.sqrt(1 - w**2))
    chi = k1 * deltaf * s2 + k2 * s2**2 - torch.deg2rad(ps) - k3
    return -torch.sin(chi) * torch.exp(-bf / 4.0 * s2) * sc


def compute_ctf(
    box_size: int,
    pixel_size_angstrom: float | Tensor,
    defocus_u_angstrom: Tensor | float,
    defocus_v_angstrom: Tensor | float,
    defocus_angle_deg: Tensor | float,
    voltage_kv: Tensor | float,
    spherical_aberration_mm: Tensor | float,
    amplitude_contrast: Tensor | float,
    phase_shift_deg: Tensor | float = 0.0,
    b_factor: Tensor | float = 0.0,
    scale: Tensor | float = 1.0,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """RELION CTF on the centred ``(D, D)`` Fourier grid of a box of ``box_size`` pixels.

    ``pixel_size_angstrom`` may be a ``(B,)`` tensor (particles from several optics groups).

    :return: ``(B, D, D)`` (or ``(D, D)`` when no parameter is batched), centred spectrum order.
    """
    if device is None:
        for p in (defocus_u_angstrom, pixel_size_angstrom, voltage_kv):
            if isinstance(p, Tensor):
                device = p.device
                break
    sx, sy = frequency_grid_2d(box_size, 1.0, device=device, dtype=dtype)
    apix = torch.as_tensor(pixel_size_angstrom, device=device, dtype=dtype)
    args = (
        defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, voltage_kv,
        spherical_aberration_mm, amplitude_contrast, phase_shift_deg, b_factor, scale,
    )
    if apix.dim() == 0:
        return ctf_from_frequencies(sx / apix, sy / apix, *args)
    # One pixel size per particle: the frequency grids are already (B, D, D), so (B,) parameters
    # must line up with that batch axis rather than add a second one.
    sx, sy = sx / apix[:, None, None], sy / apix[:, None, None]
    ref = sx if sx.dtype == torch.float64 else sx.float()
    params = [p[:, None, None] if p.dim() > 0 else p for p in _params_like(ref, *args)]
    return _relion_ctf(ref, sy.to(ref.dtype), params)


@dataclass
class CTFParams:
    """Per-particle CTF parameters as tensors of shape ``(B,)`` (RELION names and units).

    Carried in particle batches; ``compute(box_size, pixel_size)`` evaluates the CTF.
    """

    defocus_u_angstrom: Tensor
    defocus_v_angstrom: Tensor
    defocus_angle_deg: Tensor
    voltage_kv: Tensor
    spherical_aberration_mm: Tensor
    amplitude_contrast: Tensor
    phase_shift_deg: Tensor
    b_factor: Tensor
    scale: Tensor

    @classmethod
    def from_tensor(cls, table: Tensor) -> CTFParams:
        """From a ``(B, 9)`` tensor with the columns in field order."""
        return cls(*table.unbind(-1))

    def to_tensor(self) -> Tensor:
        """``(B, 9)`` tensor with the columns in field order."""
        return torch.stack([getattr(self, f.name) for f in fields(self)], -1)

    def compute(self, box_size: int, pixel_size_angstrom: float | Tensor) -> Tensor:
        """``(B, D, D)`` centred CTF."""
        return compute_ctf(
            box_size, pixel_size_angstrom, self.defocus_u_angstrom, self.defocus_v_angstrom,
            self.defocus_angle_deg, self.voltage_kv, self.spherical_aberration_mm,
            self.amplitude_contrast, self.phase_shift_deg, self.b_factor, self.scale,
            device=self.defocus_u_angstrom.device,
        )


#: Column order of the ``(N, 9)`` CTF tables carried through the data pipeline.
CTF_COLUMNS = tuple(f.name for f in fields(CTFParams))


def ctf_table_compute(table: Tensor, box_size: int, pixel_size_angstrom: float | Tensor) -> Tensor:
    """Evaluate the CTF from a ``(B, 9)`` table (columns :data:`CTF_COLUMNS`). ``(B, D, D)``."""
    return CTFParams.from_tensor(table).compute(box_size, pixel_size_angstrom)
