"""Built-in synthetic datasets with ground truth (the framework's default data).

- :mod:`hetero.data.synthetic.molecule`: a procedural Gaussian pseudo-atom molecule (core, arm on
  a hinge, head, removable subunit), its discrete / continuous / compositional states and a
  voxel rasteriser.
- :mod:`hetero.data.synthetic.simulate`: :class:`SyntheticDataset` (cached RELION 3.1 star +
  mrcs + ground truth) and :func:`load_truth`.

Example usage::

    from hetero.data.synthetic import SyntheticDataset, load_truth
    ds = SyntheticDataset(kind="continuous", n_particles=2000, box_size=64)
    star = ds.ensure()
    truth = load_truth(ds.truth_dir)
"""

from hetero.data.synthetic.molecule import (
    DOMAINS,
    PseudoAtomMolecule,
    default_atom_sigma,
    project_atoms,
    rasterize,
)
from hetero.data.synthetic.simulate import (
    GENERATOR_VERSION,
    KINDS,
    SyntheticDataset,
    default_cache_dir,
    load_truth,
)

__all__ = [
    "DOMAINS",
    "GENERATOR_VERSION",
    "KINDS",
    "PseudoAtomMolecule",
    "SyntheticDataset",
    "default_atom_sigma",
    "default_cache_dir",
    "load_truth",
    "project_atoms",
    "rasterize",
]
