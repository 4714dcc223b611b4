"""The inference pass shared by training and analysis: every particle through ``predict_step``.

A model's ``predict_step(batch)`` returns ``{"index": (B,), <name>: (B, ...), ...}``; this
pass stores every key but ``index`` as an ``(N, ...)`` array in input order (row ``i`` =
particle ``i`` of the input), plus the model's optional ``extra_outputs()`` (per-particle
arrays it keeps itself, e.g. the OPUS-DSD memory bank).

Example usage::

    arrays = predict_particles(model, datamodule.predict_dataloader(), device="cpu")
    z = arrays["z_mu"]                                        # (N, Z) float32
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def predict_particles(
    model, dataloader, device=None, progress: bool = True
) -> dict[str, np.ndarray]:
    """Run ``model.predict_step`` over ``dataloader`` and assemble the outputs by ``index``.

    :return: ``{name: (N, ...) array}``; floating arrays as float32, ``N`` = the loader's
        dataset length (or the largest index + 1).
    :raises ValueError: a key has no ``index``, or some particle was predicted never or twice.
    """
    device = torch.device(device or "cpu")
    model = model.to(device).eval()
    chunks: dict[str, list[np.ndarray]] = {}
    indices: list[np.ndarray] = []
    iterator = dataloader
    if progress:
        from rich.progress import track

        iterator = track(dataloader, description="Predicting particles", total=len(dataloader))
    for i, batch in enumerate(iterator):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = dict(model.predict_step(batch, i))
        if "index" not in out:
            raise ValueError(
                f"{type(model).__name__}.predict_step must return 'index' with its arrays"
            )
        indices.append(out.pop("index").detach().cpu().numpy().astype(np.int64))
        for name, value in out.items():
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
            chunks.setdefault(name, []).append(value.numpy())
    index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    dataset = getattr(dataloader, "dataset", None)
    n = len(dataset) if dataset is not None else (int(index.max()) + 1 if index.size else 0)
    counts = np.bincount(index, minlength=n) if index.size else np.zeros(n, np.int64)
    if len(counts) != n or (counts != 1).any():
        raise ValueError(
            f"the inference pass predicted {int((counts == 0).sum())} of {n} particles never and "
            f"{int((counts > 1).sum())} more than once; predict over all particles in one process"
        )
    arrays = {}
    for name, parts in chunks.items():
        values = np.concatenate(parts)
        full = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
        full[index] = values
        arrays[name] = full
    extras = getattr(model, "extra_outputs", None)
    if callable(extras):
        arrays.update({k: np.asarray(v) for k, v in extras().items()})
    return arrays
