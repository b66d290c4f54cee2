"""Potential: any energy model plus reference energies and scale/shift; forces and stress by autograd.

This is the one place where forces and stress are derived, for every model family:

1. a symmetric strain ε (zeros, requires grad) deforms positions and cell: r → r(1+ε), cell → cell(1+ε);
2. edge vectors are computed from the strained geometry (models see geometry only through ``edge_vec``);
3. the model gives per-atom energies e_i; E_i = scale·e_i + shift + E0[z_i] + P_i; E = Σ_i E_i per structure,
   with P_i the physics terms switched on (ZBL repulsion, D3(BJ) dispersion; :mod:`potentials.physics`), computed
   from the same strained geometry;
4. forces = −∂E/∂r (eV/Å), virial W = −∂E/∂ε (eV), stress σ = (1/V)·∂E/∂ε (eV/Å³, ASE sign).

Stress is NaN for structures that are not periodic in every direction.

With ``compile=True`` the model's forward pass (step 3's network part) runs through ``torch.compile`` whenever
the derivatives are not kept (inference, validation: ``create_graph=False``); forces and stress are then the
autograd derivatives through the compiled graph, whose backward pass the compiler builds too.  Training steps, which
differentiate the forces once more, run the model eagerly: PyTorch cannot differentiate a compiled backward pass
(docs/performance.md).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Mapping

import torch
from torch import nn

from potentials import accel, keys
from potentials.errors import PotentialsInputError
from potentials.models.base import EnergyModel
from potentials.neighbors import edge_vectors
from potentials.nn import grad_scope
from potentials.physics import PhysicsConfig, PhysicsTerms

log = logging.getLogger(__name__)

NUM_Z = 119
#: Implementations of the hot operations a potential may run on (see ``Potential``'s ``kernels`` argument).
KERNELS = ("auto", "torch", "cpu")


def compile_backend() -> str:
    """The ``torch.compile`` backend of compiled potentials: ``POTENTIALS_COMPILE_BACKEND``, else ``"inductor"``
    (``"aot_eager"`` traces the same graphs without generating code: quick, for checks)."""
    return os.environ.get("POTENTIALS_COMPILE_BACKEND", "").strip() or "inductor"


def _root_cause(err: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``err`` (the compiler wraps the error that stopped it)."""
    seen = {id(err)}
    while True:
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def _scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros((size, *src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add(0, index, src)


class Potential(nn.Module):
    """Wraps an energy model into energy, forces and stress.

    Args:
        model: an :class:`~potentials.models.base.EnergyModel` (the contract: ``forward(graph)`` returns per-atom
            energies [N], or a dict with ``node_energy`` and, for a direct-force head, ``forces``).
        cutoff: the neighbour radius the model was built for, Å.
        atomic_energies: per-element reference energies E0[z], eV (mapping z → eV); elements listed here are the
            elements the potential knows.
        scale: multiplies the model's per-atom output (eV); usually the force RMS of the training set.
        shift: added to every atom's energy, eV.
        kernels: implementation of the hot operations: ``"auto"`` (the fastest available on the device),
            ``"torch"`` (plain PyTorch operations, the reference) or ``"cpu"`` (the package's compiled CPU
            kernels); saved in model files, see :mod:`potentials.accel`.
        compile: run the model through ``torch.compile`` where no graph of the derivatives is kept (inference,
            validation); the compiled graph uses the reference operations in place of the CPU kernels.  A model
            the compiler cannot handle runs eagerly after a warning.  Saved in model files.
    """

    def __init__(
        self,
        model: nn.Module,
        cutoff: float,
        atomic_energies: Mapping[int, float] | None = None,
        scale: float = 1.0,
        shift: float = 0.0,
        kernels: str = "auto",
        physics: PhysicsConfig | Mapping | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, EnergyModel):
            raise TypeError(f"Potential needs an EnergyModel (potentials.models.base), got {type(model).__name__}")
        self.model = model
        self.kernels = kernels
        self.cutoff = float(cutoff)
        e0 = torch.zeros(NUM_Z)
        known = torch.zeros(NUM_Z, dtype=torch.bool)
        for z, e in (atomic_energies or {}).items():
            e0[int(z)] = float(e)
            known[int(z)] = True
        self.register_buffer("atomic_energies", e0)
        self.register_buffer("known_elements", known)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.physics = physics
        self.compiled = compile
        self._compiled_model = None  # built on the first call that uses it

    @property
    def physics(self) -> PhysicsConfig:
        """The physics terms added to the network energy; setting it (a config or mapping) rebuilds them."""
        return self._physics

    @physics.setter
    def physics(self, value: PhysicsConfig | Mapping | None) -> None:
        config = PhysicsConfig.from_options(value)
        if config.any and self.model.direct_forces:
            raise PotentialsInputError("physics terms need forces derived from the energy; this model has a "
                                       "direct-force head")
        self._physics = config
        dd = {"device": self.scale.device, "dtype": self.scale.dtype}
        self.physics_terms = PhysicsTerms(self._physics, self.cutoff).to(**dd) if self._physics.any else None

    @property
    def kernels(self) -> str:
        """Implementation of the hot operations: one of :data:`KERNELS`."""
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        if value not in KERNELS:
            raise PotentialsInputError(f"kernels must be one of {', '.join(map(repr, KERNELS))}, got {value!r}")
        self._kernels = value

    @property
    def compiled(self) -> bool:
        """Whether the model runs through ``torch.compile`` where no derivative graph is kept (``compile``)."""
        return self._compile

    @compiled.setter
    def compiled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise PotentialsInputError(f"compile must be true or false, got {value!r}")
        self._compile = value

    def __getstate__(self) -> dict:
        # copies and pickles leave the compiled function behind (a copy compiles its own on first use)
        state = super().__getstate__().copy()
        state["_compiled_model"] = None
        return state

    def _run_model(self, data, derivatives_only: bool):
        """The model's output for ``data``: compiled (``compiled`` set, no derivative graph kept) or eager."""
        if not (self._compile and derivatives_only):
            return self.model(data)
        first = self._compiled_model is None
        if first:
            self.__dict__["_compiled_model"] = torch.compile(self.model, dynamic=True, backend=compile_backend())
        # the weights enter as constants: the compiled backward pass computes position and strain derivatives only
        params = [p for p in self.model.parameters() if p.requires_grad]
        start = time.perf_counter()
        try:
            for p in params:
                p.requires_grad_(False)
            out = self._compiled_model(data)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler: run eagerly (a real error recurs there)
            log.warning("torch.compile failed for %s, running it without compiling (same results, no speed-up): %s",
                        type(self.model).__name__, _root_cause(err))
            self.compiled = False
            out = None
        finally:
            for p in params:
                p.requires_grad_(True)
        if out is None:
            return self.model(data)
        if first:
            log.info("torch.compile: %s compiled in %.1f s (its first call, on %d atoms)", type(self.model).__name__,
                     time.perf_counter() - start, data.pos.shape[0])
        return out

    @property
    def elements(self) -> list[int]:
        """Atomic numbers with a reference energy (the elements trained on)."""
        return torch.nonzero(self.known_elements).flatten().tolist()

    def check_elements(self, z: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``z`` holds elements the potential was not trained on (when it knows any)."""
        if not bool(self.known_elements.any()):
            return
        unknown = sorted(set(z.unique().tolist()) - set(self.elements))
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[u] for u in unknown)
            known = ", ".join(chemical_symbols[u] for u in self.elements)
            raise PotentialsInputError(f"the structure contains elements the model never saw: {names} (trained on: "
                                       f"{known})")

    def forward(
        self,
        data,
        compute_forces: bool = True,
        compute_stress: bool = True,
        create_graph: bool | None = None,
        head_forces: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energy, forces and stress of a (batched) :class:`~potentials.graph.AtomicGraph`.

        Args:
            data: graph or PyG batch with ``pos``, ``z``, ``cell``, ``pbc``, ``edge_index``, ``cell_offsets``.
            compute_forces: derive forces [N, 3] eV/Å.
            compute_stress: derive stress [B, 3, 3] eV/Å³ (NaN where not fully periodic) and virial [B, 3, 3] eV.
            create_graph: keep the graph of the derivatives (needed to train on forces); defaults to
                ``self.training``.
            head_forces: for a shallow ensemble (a model returning ``node_energy_heads``), derive each head's
                forces and stress too, from one model pass (:func:`head_gradients`: one batched backward pass with
                ``create_graph``, one backward pass per head without, the faster of the two in each case);
                ``forces`` and ``stress`` are then their mean.  Ignored for other models.

        Returns:
            dict with ``energy`` [B], ``node_energy`` [N] and, as asked, ``forces``, ``stress``, ``virial``; for a
            shallow ensemble ``energy_heads`` [B, K], ``node_energy_heads`` [N, K] and with ``head_forces``
            ``forces_heads`` [K, N, 3], ``stress_heads`` and ``virial_heads`` [K, B, 3, 3].
        """
        create_graph = self.training if create_graph is None else create_graph
        pos, cell, z = data.pos, data.cell.reshape(-1, 3, 3), data.z
        n_atoms = pos.shape[0]
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(n_atoms, dtype=torch.long, device=pos.device)
        n_graphs = cell.shape[0]
        with torch.enable_grad():
            inputs = []
            if compute_forces:
                if not pos.requires_grad:
                    pos = pos.detach().requires_grad_(True)
                inputs.append(pos)
            if compute_stress:
                strain = torch.zeros(n_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                pos = pos + torch.einsum("na,nab->nb", pos, sym[batch])
                cell = cell + torch.bmm(cell, sym)
                inputs.append(strain)
            data = copy.copy(data)  # shallow: new attribute store, same tensors
            data.batch = batch
            data.edge_vec = edge_vectors(pos, data.edge_index, data.cell_offsets, cell, batch)
            # differentiated below with respect to positions and strain only, the graph not kept: no parameter
            # gradients can be asked of it (custom autograd functions may then skip theirs)
            derivatives_only = bool(inputs) and not create_graph and not self.model.direct_forces
            # small steps on one thread where OpenMP threads sleep between operations (potentials.accel.threads)
            with accel.backend(self.kernels), accel.small_steps_serial(derivatives_only):
                with grad_scope.inputs_only(derivatives_only):
                    out = self._run_model(data, derivatives_only)
                direct_forces = heads = None
                if isinstance(out, Mapping):
                    direct_forces = out.get(keys.FORCES)
                    heads = out.get(keys.NODE_ENERGY_HEADS)
                    out = out[keys.NODE_ENERGY]
                node_energy = (self.scale * out + self.shift + self.atomic_energies[z]).to(pos.dtype)
                if self.physics_terms is not None:
                    node_energy = node_energy + self.physics_terms(data, pos, cell, batch)
                energy = _scatter_sum(node_energy, batch, n_graphs)
                result = {keys.ENERGY: energy, keys.NODE_ENERGY: node_energy}
                per_head = False
                if heads is not None:  # a shallow ensemble's heads differ only in the network's term
                    spread = self.scale * (heads - out.unsqueeze(-1)).to(pos.dtype)
                    result[keys.NODE_ENERGY_HEADS] = node_energy.unsqueeze(-1) + spread
                    result[keys.ENERGY_HEADS] = energy.unsqueeze(-1) + _scatter_sum(spread, batch, n_graphs)
                    per_head = head_forces and direct_forces is None
                if direct_forces is not None:
                    result[keys.FORCES] = direct_forces * self.scale
                    if compute_forces:
                        inputs = inputs[1:]
                if inputs and per_head:  # [K, ...] per head; the mean energy's derivatives are their mean
                    # batched under vmap when training (cheaper there), one backward pass per head at inference
                    grads = head_gradients(result[keys.ENERGY_HEADS], inputs, create_graph, batched=create_graph)
                elif inputs:
                    grads = torch.autograd.grad(
                        [energy.sum()], inputs, create_graph=create_graph, allow_unused=True
                    )
            if inputs:
                lead = (result[keys.ENERGY_HEADS].shape[-1],) if per_head else ()
                grads = [g if g is not None else x.new_zeros(lead + tuple(x.shape))
                         for g, x in zip(grads, inputs, strict=True)]
                if compute_forces and direct_forces is None:
                    if per_head:
                        result[keys.FORCES_HEADS] = -grads[0]
                        result[keys.FORCES] = -grads[0].mean(0)
                    else:
                        result[keys.FORCES] = -grads[0]
                if compute_stress:
                    de_dstrain = grads[-1]
                    volume = torch.linalg.det(cell).abs()
                    periodic = data.pbc.reshape(-1, 3).all(dim=1) & (volume > 1e-8)
                    safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
                    stress = de_dstrain / safe_volume.view(-1, 1, 1)
                    nan = torch.full_like(stress, math.nan)
                    stress = torch.where(periodic.view(-1, 1, 1), stress, nan)
                    if per_head:
                        result[keys.STRESS_HEADS], result[keys.VIRIAL_HEADS] = stress, -de_dstrain
                        stress, de_dstrain = stress.mean(0), de_dstrain.mean(0)
                    result[keys.STRESS] = stress
                    result[keys.VIRIAL] = -de_dstrain
        return result


def head_gradients(head_energy: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool, batched: bool = True
                   ) -> list[torch.Tensor | None]:
    """Derivatives of every head's energy [B, K], ∂(Σ_b E_bk)/∂x for each input x, stacked over heads: [K, *x.shape].

    One batched backward pass (``is_grads_batched``: the K unit vectors as a batch of output gradients, run through
    the backward graph at once by vmap) instead of K passes.  Operations vmap cannot batch (some custom kernels) fall
    back to one backward pass per head (``batched=False`` asks for it), the same numbers.
    """
    k = head_energy.shape[-1]
    total = head_energy.sum(0)  # [K]: the heads are independent sums over structures
    if batched:
        eye = torch.eye(k, dtype=total.dtype, device=total.device)
        try:
            return list(torch.autograd.grad([total], inputs, grad_outputs=[eye], is_grads_batched=True,
                                            retain_graph=True, create_graph=create_graph, allow_unused=True))
        except (RuntimeError, NotImplementedError):  # an operation vmap cannot batch: one pass per head below
            pass
    per_head = [torch.autograd.grad([total[i]], inputs, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True) for i in range(k)]
    return [None if parts[0] is None else torch.stack(parts)
            for parts in ([g[j] for g in per_head] for j in range(len(inputs)))]
