"""The geometric and optical conventions of ``hetero``, written down once.

RELION's conventions are the contract. Every other tool's metadata is converted to
them when it is read, and every function in :mod:`hetero.physics` follows them.

Arrays and axes
---------------
* Images are arrays ``img[..., y, x]`` (row = y, column = x), volumes ``vol[..., z, y, x]``,
  exactly as they are stored in an MRC file (x fastest). Physical coordinates of a pixel
  are ``r = (x, y[, z]) = (index - D // 2) * pixel_size``: the centre of rotation is the
  pixel at index ``D // 2`` (for even ``D`` that is one past the middle, as in RELION).
* Centred Fourier transforms put the zero frequency at index ``D // 2`` as well;
  frequency index ``k = index - D // 2`` means ``k / (D * pixel_size)`` cycles per Å.
  Forward transforms are unnormalised (``torch.fft`` ``norm="backward"``).
* Densities are *white*: a protein has positive values in volumes and in (CTF-free)
  projections. RELION's CTF is positive at zero frequency, so experimental images,
  once contrast-inverted during extraction as RELION requires, are white too.
  Inputs that store black particles are brought to white when they are read:
  cryoSPARC's ``blob/sign`` (``-1`` for its default, dark-protein extraction) multiplies
  the pixels (``ParticleTable.image_sign``); any other source is checked by
  ``data.invert_contrast: auto`` (the default), which reconstructs a half map of a few
  hundred particles with their poses and CTF and takes the sign of its skewness inside the
  particle (protein is a few dense features on flat solvent), refusing when ambiguous
  (:mod:`hetero.data.contrast`). ``data.invert_contrast=true|false`` states it instead.

Rotations (RELION ``Euler_angles2matrix``)
------------------------------------------
Angles ``(rot, tilt, psi)`` in degrees define ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with the
*passive* elementary matrices::

    Rz(a) = [[ cos a,  sin a, 0],       Ry(b) = [[cos b, 0, -sin b],
             [-sin a,  cos a, 0],                [    0, 1,      0],
             [     0,      0, 1]]                [sin b, 0,  cos b]]

``A`` maps volume coordinates to image-frame coordinates: a point ``r_vol`` of the volume
appears in the projection at ``(A @ r_vol)[:2]``. Equivalently the rotated volume is
``V'(r) = V(A.T @ r)`` and the projection is ``P(x, y) = sum_z V'(x, y, z)``. In Fourier
space (projection-slice theorem) ``F[P](k) = F[V](A.T @ (kx, ky, 0))``.

The viewing (projection) direction in the volume frame is ``A.T @ (0, 0, 1)``, the third row
of ``A``: ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``, so HEALPix ``theta = tilt``,
``phi = rot``.

Shifts (RELION ``rlnOriginX/Y``, ``rlnOriginXAngst/YAngst``)
------------------------------------------------------------
RELION *centres* a particle by translating the image by ``+origin``; the particle's centre
therefore sits at ``box_centre - origin`` in the raw image. Our forward model is::

    image = translate(CTF * project(V, A), -origin)

with ``translate(img, t)(r) = img(r - t)``. RELION 3.0 stores the origin in pixels
(``rlnOriginX``), RELION 3.1+ in Å (``rlnOriginXAngst``); we carry it in Å
(``origin_x_angstrom``) and convert with the pixel size of the image it refers to.

CTF (RELION ``CTF::getCTF``)
----------------------------
With ``s`` the spatial frequency in 1/Å, ``alpha`` its azimuth ``atan2(sy, sx)``, defocus in Å
(positive = underfocus), Cs in mm, voltage in kV, amplitude contrast ``Q0``, phase shift
in degrees, B-factor in Å^2::

    lambda  = 12.2643247 / sqrt(V * (1 + 0.978466e-6 * V))          (V in volts, lambda in Å)
    deltaf  = -(dU + dV)/2 - (dU - dV)/2 * cos(2 * (alpha - angle))
    chi     = pi * lambda * deltaf * s^2 + pi/2 * Cs * 1e7 * lambda^3 * s^4
              - phase_shift - atan(Q0 / sqrt(1 - Q0^2))
    CTF     = scale * -sin(chi) * exp(-B/4 * s^2)

so ``CTF(0) = scale * Q0 > 0``.

Other tools, converted on reading
---------------------------------
* **cryoSPARC** ``.cs``: ``blob/sign`` is the factor to white density (see above);
  ``alignments3D/alpha`` (per-particle amplitude scale) multiplies the CTF scale.
  ``alignments3D/pose`` is an axis-angle (rotation-vector) ``w``;
  ``R = expm([w]_x)`` is RELION's ``A`` transposed (``A = R.T``), as in cryoDRGN's
  ``parse_pose_csparc``. ``alignments3D/shift`` is in pixels of the ``blob`` and equals RELION's
  origin (``origin_px = shift``). Defocus in ``ctf/df1_A``/``df2_A`` (U/V, Å), ``ctf/df_angle_rad``
  (radians), ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/phase_shift_rad``.
* **cryoDRGN** pose pickles ``(rot (N,3,3), trans (N,2))``: ``rot`` *is* RELION's ``A``
  (cryoDRGN's ``R_from_relion`` multiplies active z-rotations and flips four off-diagonal
  signs, which is algebraically RELION's passive product), applied to volume arrays
  ``[z, y, x]`` exactly as here: projecting ``toymodel_small_nocenter.mrc`` with ``A = rot``
  reproduces cryoDRGN's ``toy_projections.mrcs`` (correlation 1.0, pinned by a test).
  ``trans`` is RELION's origin as a fraction of the box: ``origin_px = trans * D``.
  cryoDRGN CTF tables ``(N, 9) = (D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase_shift)``
  use the same units as RELION; note that cryoDRGN's own ``compute_ctf`` is ``-1`` times
  RELION's (it expects non-inverted, black particles).
"""

from __future__ import annotations

#: Electron wavelength prefactor (Å * sqrt(V)), RELION's constant.
WAVELENGTH_PREFACTOR = 12.2643247
#: Relativistic correction (1/V), RELION's constant.
RELATIVISTIC_CORRECTION = 0.978466e-6


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (RELION's formula)."""
    volts = voltage_kv * 1e3
    return WAVELENGTH_PREFACTOR / (volts * (1.0 + volts * RELATIVISTIC_CORRECTION)) ** 0.5
