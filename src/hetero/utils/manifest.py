"""The run manifest ``<run_dir>/manifest.json``: what a training run offers analysis.

Written atomically by the training task on rank 0 (at the start of training and again at the
end), never by analysis; read by :class:`hetero.analysis.rundir.RunDir`. The format is fixed
in ``docs/design/analysis_interface.md``::

    {
      "format": 1,
      "method": "opusdsd",
      "result_loader": "hetero.analysis.result.load_model_result",
      "parts": {
        "model":   {"kind": "checkpoint", "path": "checkpoints/best.ckpt", "config": "config_resolved.yaml"},
        "latents": {"kind": "latents", "path": "latents/best-0123456789ab/"}
      },
      "analysis_steps": []
    }

Paths in ``parts`` are relative to the run directory (absolute paths are allowed for parts that
live elsewhere, e.g. another run).

Example usage::

    write_manifest(run_dir, run_manifest(model.manifest(), checkpoint="checkpoints/best.ckpt"))
    manifest = read_manifest(run_dir)      # None when the run has none
"""

from __future__ import annotations

import json
from pathlib import Path

from hetero.utils.files import write_json

MANIFEST_NAME = "manifest.json"
FORMAT = 1
REQUIRED = ("format", "method", "result_loader", "parts", "analysis_steps")


class ManifestError(ValueError):
    """A run manifest is malformed (the message names the file and the field)."""


def run_manifest(
    model_manifest: dict, checkpoint: str | Path | None = None, latents: str | Path | None = None
) -> dict:
    """The full manifest from a model's :meth:`~hetero.models.base.HeteroModel.manifest`.

    :param checkpoint: path of the checkpoint analysis loads by default (relative to the run
        dir), replacing the model part's default ``checkpoints/best.ckpt``.
    :param latents: folder of the per-particle arrays of the inference pass (relative).
    """
    manifest = {"format": FORMAT, **json.loads(json.dumps(model_manifest))}
    parts = manifest.setdefault("parts", {})
    if checkpoint is not None:
        parts.setdefault("model", {"kind": "checkpoint", "config": "config_resolved.yaml"})
        parts["model"]["path"] = str(checkpoint)
    if latents is not None:
        parts["latents"] = {"kind": "latents", "path": str(latents).rstrip("/") + "/"}
    manifest.setdefault("analysis_steps", [])
    validate_manifest(manifest, MANIFEST_NAME)
    return manifest


def write_manifest(run_dir: str | Path, manifest: dict) -> Path:
    """Validate and write ``<run_dir>/manifest.json`` atomically."""
    path = Path(run_dir) / MANIFEST_NAME
    validate_manifest(manifest, path)
    return write_json(path, manifest)


def read_manifest(run_dir: str | Path) -> dict | None:
    """``<run_dir>/manifest.json`` validated, or ``None`` when the run has no manifest.

    :raises ManifestError: naming the file and what is wrong.
    """
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: dict, where: str | Path) -> None:
    """Check the fields of a manifest. :raises ManifestError: naming ``where`` and the field."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: a manifest is a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ManifestError(
            f"{where}: format {manifest['format']!r} is not supported by this hetero (reads {FORMAT})"
        )
    if not isinstance(manifest["result_loader"], str) or "." not in manifest["result_loader"]:
        raise ManifestError(
            f"{where}: result_loader must be a dotted path, got {manifest['result_loader']!r}"
        )
    if not isinstance(manifest["parts"], dict):
        raise ManifestError(f"{where}: parts must be an object")
    for name, part in manifest["parts"].items():
        if not isinstance(part, dict) or "kind" not in part or "path" not in part:
            raise ManifestError(f"{where}: part {name!r} needs 'kind' and 'path', got {part!r}")
    steps = manifest["analysis_steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) and "." in s for s in steps):
        raise ManifestError(
            f"{where}: analysis_steps must be a list of dotted paths, got {steps!r}"
        )
