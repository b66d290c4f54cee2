"""Physics terms a :class:`~potentials.potential.Potential` may add to its network energy: ZBL and D3(BJ).

Both are per-atom energies (eV) added inside ``Potential`` before forces and stress are derived, so forces and
stress stay derivatives of one energy, and a network trained with a term on learns the labels minus the term.

* **ZBL** — the universal screened nuclear repulsion of Ziegler, Biersack and Littmark (*The Stopping and Range of
  Ions in Solids*, 1985): ``E(r) = Z1 Z2 e²/(4πε0 r) · φ(r/a)``, ``a = 0.8854 a0 / (Z1^0.23 + Z2^0.23)``,
  ``φ(x) = 0.18175 e^(−3.1998x) + 0.50986 e^(−0.94229x) + 0.28022 e^(−0.4029x) + 0.02817 e^(−0.20162x)``, with
  ``0.8854 a0 = 0.46850 Å`` and ``e²/(4πε0) = 14.399645 eV·Å`` (the values LAMMPS's ``pair_style zbl`` uses).
  It is a pair term over the model's edge list, switched off smoothly between an inner and an outer radius per
  element pair: ``r_in = 0.5·(R1 + R2)``, ``r_out = 0.8·(R1 + R2)`` with R the covalent radii of
  ``ase.data.covalent_radii`` (Cordero et al., Dalton Trans. 2008, 2832), so the switch ends below the usual bond
  lengths (C–C 1.52 Å: r_out 1.22 Å; Cu–Cu 2.55 Å: 2.11 Å).  The switch is the C² smoothstep
  ``S(t) = 1 − 10t³ + 15t⁴ − 6t⁵``, ``t = (r − r_in)/(r_out − r_in)``; r_out never exceeds the model cutoff.
* **D3(BJ)** — Grimme's D3 dispersion with Becke–Johnson damping, two-body part (no three-body ATM term, as
  ORCA's and VASP's D3BJ), through ``tad-dftd3`` (reference C6, coordination numbers, damping parameters of a
  named functional).  Pairs come from a neighbour list of their own (periodic images included) within the D3
  cutoffs, 60 Bohr for the energy and 40 Bohr for the coordination number, as the reference implementation.

The options are recorded in model files as the ``physics`` section (:meth:`PhysicsConfig.to_section`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from potentials.errors import PotentialsInputError
from potentials.neighbors import edge_vectors, neighbor_list

#: e²/(4πε0) in eV·Å, and the ZBL screening length 0.8854·a0 in Å (both as in LAMMPS's pair_style zbl)
COULOMB = 14.399645
ZBL_A0 = 0.46850
#: the universal screening function: coefficients and exponents
ZBL_C = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_D = (3.19980, 0.94229, 0.40290, 0.20162)
#: switch radii as fractions of the sum of the two covalent radii (written into model files)
ZBL_INNER, ZBL_OUTER = 0.5, 0.8
DISPERSIONS = (None, "d3bj")
#: D3 real-space cutoffs, Bohr (those of the reference implementation)
D3_CUTOFF, D3_CN_CUTOFF = 60.0, 40.0


@dataclass(frozen=True)
class PhysicsConfig:
    """Which physics terms are on.

    Args:
        zbl: add the ZBL repulsion.
        dispersion: ``None`` or ``"d3bj"``.
        functional: the functional whose D3(BJ) parameters are used (e.g. ``"pbe"``); needed with ``d3bj``.
        zbl_inner, zbl_outer: the ZBL switch radii as fractions of the sum of covalent radii.
    """

    zbl: bool = False
    dispersion: str | None = None
    functional: str | None = None
    zbl_inner: float = ZBL_INNER
    zbl_outer: float = ZBL_OUTER
    d3: dict[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.dispersion not in DISPERSIONS:
            raise PotentialsInputError(f"physics.dispersion must be null or 'd3bj', got {self.dispersion!r}")
        if self.dispersion and not self.functional:
            raise PotentialsInputError("physics.dispersion=d3bj needs physics.functional (e.g. pbe), the functional "
                                       "the labels were computed with")
        if not 0 < self.zbl_inner < self.zbl_outer:
            raise PotentialsInputError(f"ZBL switch radii must satisfy 0 < inner < outer, got {self.zbl_inner}, "
                                       f"{self.zbl_outer}")

    @property
    def any(self) -> bool:
        return bool(self.zbl or self.dispersion)

    @classmethod
    def from_options(cls, options: Any) -> PhysicsConfig:
        """From a mapping (a config's ``physics`` block, a file's section), a PhysicsConfig, or None (all off).

        Keys missing from a mapping take the defaults of the first version that wrote them (all off, switch
        0.5/0.8).
        """
        if options is None:
            return cls()
        if isinstance(options, PhysicsConfig):
            return options
        o = dict(options)
        unknown = sorted(set(o) - {"zbl", "dispersion", "functional", "zbl_switch", "d3"})
        if unknown:
            raise PotentialsInputError(f"unknown physics options {unknown}; known: zbl, dispersion, functional")
        switch = o.get("zbl_switch") or {}
        functional = o.get("functional")
        return cls(zbl=bool(o.get("zbl", False)), dispersion=o.get("dispersion"),
                   functional=str(functional).lower() if functional else None,
                   zbl_inner=float(switch.get("inner", ZBL_INNER)), zbl_outer=float(switch.get("outer", ZBL_OUTER)),
                   d3={k: float(v) for k, v in (o.get("d3") or {}).items()})

    def to_section(self) -> dict[str, Any]:
        """The model file's ``physics`` section (plain data)."""
        section: dict[str, Any] = {"zbl": self.zbl, "dispersion": self.dispersion, "functional": self.functional}
        if self.zbl:
            section["zbl_switch"] = {"inner": self.zbl_inner, "outer": self.zbl_outer,
                                     "radii": "ase.data.covalent_radii (sum of the pair)"}
        if self.dispersion:
            section["d3"] = dict(self.d3) or d3_parameters(self.functional)
        return section


def smoothstep_off(t: torch.Tensor) -> torch.Tensor:
    """1 for t ≤ 0, 0 for t ≥ 1, ``1 − 10t³ + 15t⁴ − 6t⁵`` between: value, slope and curvature continuous."""
    t = t.clamp(0.0, 1.0)
    return 1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t * t)


class ZBL(nn.Module):
    """ZBL repulsion over an edge list, switched off between element-pair radii (module docstring).

    Args:
        cutoff: the model's neighbour radius, Å; the outer switch radius is capped there.
        inner, outer: switch radii as fractions of the sum of the pair's covalent radii.
    """

    def __init__(self, cutoff: float, inner: float = ZBL_INNER, outer: float = ZBL_OUTER) -> None:
        super().__init__()
        from ase.data import covalent_radii

        self.cutoff, self.inner, self.outer = float(cutoff), float(inner), float(outer)
        self.register_buffer("radii", torch.tensor(np.asarray(covalent_radii[:119], dtype=np.float64)),
                             persistent=False)

    def pair_energy(self, zi: torch.Tensor, zj: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Switched ZBL energy (eV) of pairs with atomic numbers ``zi``, ``zj`` [E] at distances ``r`` [E] Å."""
        dtype = r.dtype
        z1, z2 = zi.to(dtype), zj.to(dtype)
        x = r * (z1.pow(0.23) + z2.pow(0.23)) / ZBL_A0
        phi = sum(c * torch.exp(-d * x) for c, d in zip(ZBL_C, ZBL_D, strict=True))
        energy = COULOMB * z1 * z2 / r * phi
        rsum = (self.radii[zi] + self.radii[zj]).to(dtype)
        r_out = torch.clamp(self.outer * rsum, max=self.cutoff)
        r_in = torch.minimum(self.inner * rsum, r_out * (self.inner / self.outer))
        return energy * smoothstep_off((r - r_in) / (r_out - r_in))

    def forward(self, z: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
        """Per-atom ZBL energies [N] (eV): half of each directed edge's pair energy goes to its centre atom."""
        j, i = edge_index[0], edge_index[1]
        r = edge_vec.norm(dim=-1)
        e = 0.5 * self.pair_energy(z[i], z[j], r)
        return torch.zeros(z.shape[0], dtype=edge_vec.dtype, device=edge_vec.device).index_add(0, i, e)


def d3_parameters(functional: str) -> dict[str, float]:
    """D3(BJ) damping parameters (s6, s8, a1, a2 in Bohr) of ``functional`` from tad-dftd3's table; two-body only."""
    from tad_dftd3.param import get_functional_params

    try:
        p = get_functional_params(functional, damping="bj")
    except (KeyError, ValueError) as err:
        raise PotentialsInputError(f"no D3(BJ) parameters for the functional {functional!r} ({err})") from err
    return {"s6": float(p.get("s6", 1.0)), "s8": float(p["s8"]), "a1": float(p["a1"]), "a2": float(p["a2"]),
            "s9": 0.0}


class D3BJ(nn.Module):
    """Two-body D3(BJ) dispersion (eV) from positions and cell, over a pair list of its own.

    Args:
        functional: name of the functional (tad-dftd3's table; ``"pbe"``, ``"b3lyp"``, …).
        param: s6, s8, a1, a2 (Bohr) as written in a model file; None takes the table's for ``functional``.
        cutoff, cn_cutoff: real-space cutoffs of the energy and the coordination number, Bohr.
    """

    def __init__(self, functional: str, param: dict[str, float] | None = None, cutoff: float = D3_CUTOFF,
                 cn_cutoff: float = D3_CN_CUTOFF) -> None:
        super().__init__()
        from tad_mctc.units import energy, length

        self.functional = functional
        self.param = dict(param) if param else d3_parameters(functional)
        self.bohr = 1.0 / float(length.AA2AU)  # Å per Bohr
        self.hartree = float(energy.AU2EV)  # eV per Hartree
        self.cutoff, self.cn_cutoff = float(cutoff), float(cn_cutoff)
        self._tables: dict[torch.device, Any] = {}

    def _reference(self, device: torch.device):
        if device not in self._tables:
            import tad_dftd3 as d3
            from tad_mctc.data import radii

            dd = {"device": device, "dtype": torch.float64}
            self._tables[device] = (d3.reference.Reference(**dd), radii.COV_D3(**dd), d3.data.R4R2(**dd))
        return self._tables[device]

    def pairs(self, data, batch: torch.Tensor, cutoff_bohr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair list (j, i) and integer images of every structure in ``data`` within ``cutoff_bohr``."""
        pos = data.pos.detach().double().cpu().numpy()
        cells = data.cell.reshape(-1, 3, 3).detach().double().cpu().numpy()
        pbcs = data.pbc.reshape(-1, 3).cpu().numpy()
        counts = torch.bincount(batch.cpu(), minlength=cells.shape[0]).tolist()
        index, offsets, start = [], [], 0
        for b, n in enumerate(counts):
            e, s = neighbor_list(pos[start:start + n], cells[b], pbcs[b], cutoff_bohr * self.bohr)
            index.append(torch.from_numpy(e + start))
            offsets.append(torch.from_numpy(s))
            start += n
        device = data.pos.device
        return torch.cat(index, 1).to(device), torch.cat(offsets).to(device)

    def forward(self, data, pos: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Per-atom dispersion energies [N] (eV), differentiable in ``pos`` and ``cell`` (Å, possibly strained)."""
        from tad_dftd3.model import atomic_c6, weight_references
        from tad_mctc.ncoord.count import exp_count

        ref, rcov, r4r2 = self._reference(pos.device)
        z = data.z
        edges, offsets = self.pairs(data, batch, self.cutoff)
        vec = edge_vectors(pos.double(), edges, offsets, cell.double(), batch) / self.bohr
        r = vec.norm(dim=-1)
        j, i = edges[0], edges[1]
        # coordination numbers over the pairs within the CN cutoff
        near = r <= self.cn_cutoff
        count = exp_count(r[near], rcov[z[i[near]]] + rcov[z[j[near]]])
        cn = torch.zeros(z.shape[0], dtype=r.dtype, device=r.device).index_add(0, i[near], count)
        # C6 of every atom pair of a structure depends only on the two atoms (their elements and CNs)
        c6 = torch.empty_like(r)
        for b in torch.unique(batch).tolist():
            atoms = torch.nonzero(batch == b).flatten()
            local = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
            local[atoms] = torch.arange(atoms.numel(), device=z.device)
            weights = weight_references(z[atoms], cn[atoms], ref)
            c6_b = atomic_c6(z[atoms], weights, ref)
            in_b = batch[i] == b
            c6[in_b] = c6_b[local[i[in_b]], local[j[in_b]]]
        p = self.param
        qq = 3.0 * r4r2[z[i]] * r4r2[z[j]]
        r0 = p["a1"] * torch.sqrt(qq) + p["a2"]
        e = -(p["s6"] * c6 / (r**6 + r0**6) + p["s8"] * c6 * qq / (r**8 + r0**8))
        e = 0.5 * e * self.hartree  # each pair is listed twice, (i, j) and (j, i)
        return torch.zeros(z.shape[0], dtype=r.dtype, device=r.device).index_add(0, i, e).to(pos.dtype)


class PhysicsTerms(nn.Module):
    """The terms a :class:`PhysicsConfig` switches on, as one module of per-atom energies (eV)."""

    def __init__(self, config: PhysicsConfig, cutoff: float) -> None:
        super().__init__()
        self.config = config
        self.zbl = ZBL(cutoff, config.zbl_inner, config.zbl_outer) if config.zbl else None
        self.d3 = D3BJ(config.functional, config.d3) if config.dispersion == "d3bj" else None

    def forward(self, data, pos: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Per-atom energies [N] eV; ``data`` carries ``z``, ``edge_index``, ``edge_vec`` (of ``pos``/``cell``)."""
        out = torch.zeros(pos.shape[0], dtype=pos.dtype, device=pos.device)
        if self.zbl is not None:
            out = out + self.zbl(data.z, data.edge_index, data.edge_vec)
        if self.d3 is not None:
            out = out + self.d3(data, pos, cell, batch)
        return out


#: marks an override that was not given (``None`` is a value: no dispersion)
KEEP = "keep"


def with_overrides(trained: PhysicsConfig, zbl: bool | None = None, dispersion: str | None = KEEP,
                   functional: str | None = None) -> PhysicsConfig:
    """``trained`` with inference overrides; refuses one that removes or replaces a term the model was trained with.

    A network trained with a term learnt the labels minus that term, so its energy without the term is not a
    potential of anything.  Adding a term the model was trained without (D3 on top of a model of PBE labels) is
    allowed.

    Args:
        trained: the model file's physics terms.
        zbl: True/False to switch ZBL on/off; None keeps the file's.
        dispersion: ``"d3bj"`` or None; :data:`KEEP` keeps the file's.
        functional: the D3 functional; None keeps the file's.
    """
    zbl = trained.zbl if zbl is None else bool(zbl)
    dispersion = trained.dispersion if dispersion == KEEP else dispersion
    if functional and not dispersion:
        raise PotentialsInputError(f"functional={functional!r} given without a dispersion term; add "
                                   "dispersion='d3bj'")
    functional = (functional or trained.functional) if dispersion else None
    functional = functional.lower() if functional else None
    if trained.zbl and not zbl:
        raise PotentialsInputError("zbl=False: this model was trained with the ZBL repulsion added to its network "
                                   "(the network learnt the labels minus ZBL); it cannot be removed")
    if trained.dispersion and dispersion != trained.dispersion:
        raise PotentialsInputError(f"dispersion={dispersion!r}: this model was trained with "
                                   f"{trained.dispersion} ({trained.functional}) added to its network (the network "
                                   "learnt the labels minus it); it cannot be removed or replaced")
    if trained.dispersion and functional != trained.functional:
        raise PotentialsInputError(f"functional={functional!r}: this model was trained with {trained.dispersion} "
                                   f"for {trained.functional}; the functional of a trained term cannot be changed")
    d3 = trained.d3 if trained.dispersion else {}
    return PhysicsConfig(zbl=zbl, dispersion=dispersion, functional=functional, zbl_inner=trained.zbl_inner,
                         zbl_outer=trained.zbl_outer, d3=d3)


def baseline(config: PhysicsConfig, cutoff: float) -> Callable[[Any], tuple[float, np.ndarray]]:
    """``graph → (energy eV, forces [N, 3] eV/Å)`` of the terms ``config`` switches on, in float64, for the
    training statistics (:func:`potentials.datasets.stats.compute_stats`)."""
    from torch_geometric.data import Batch

    terms = PhysicsTerms(config, cutoff).double()

    def energy_forces(graph) -> tuple[float, np.ndarray]:
        data = Batch.from_data_list([graph])
        pos = data.pos.detach().double().requires_grad_(True)
        cell = data.cell.reshape(-1, 3, 3).double()
        batch = torch.zeros(pos.shape[0], dtype=torch.long)
        data.edge_vec = edge_vectors(pos, data.edge_index, data.cell_offsets, cell, batch)
        energy = terms(data, pos, cell, batch).sum()
        (grad,) = torch.autograd.grad(energy, pos)
        return float(energy), -grad.numpy()

    return energy_forces
