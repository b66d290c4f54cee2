"""Equivariant graph attention of EquiformerV2 (built on eSCN's SO(2) convolution) and the edge-degree embedding.

Smoothness at the cutoff.  Attention normalises over each centre's neighbours, so an edge leaving the cutoff would
change every other weight of that centre.  Here the softmax is weighted by the envelope u(r) (1 at r = 0; value and
first two derivatives 0 at the cutoff), and each message is multiplied by u once more:

    w_ij = u(r_ij)·exp(a_ij) / Σ_k u(r_ik)·exp(a_ik),      message_ij = u(r_ij)·w_ij·v_ij

so an edge's contribution and its share of the normalisation both vanish smoothly as r_ij → cutoff, and a centre
with a single neighbour at the cutoff sees that message fade out instead of jumping.  Far inside the cutoff u ≈ 1
and this is the paper's softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch_geometric.utils import scatter

from potentials import accel
from potentials.accel import ops
from potentials.models.equiformer.grid import S2Grid, SeparableS2Activation
from potentials.models.equiformer.layers import RadialMLP, SmoothLeakyReLU
from potentials.models.equiformer.so2 import SO2Convolution
from potentials.models.equiformer.so3 import EdgeLayout
from potentials.nn.irreps import DegreeLinear, GateActivation


@dataclass
class EdgeData:
    """Per-edge quantities shared by every layer of one forward pass.

    Attributes:
        src, dst: [E] neighbour j and centre i of each edge (messages flow j → i).
        rot: [E, R, (lmax+1)²] rotation into the edge frame, keeping |m| ≤ mmax.
        radial: [E, num_basis] radial basis of the edge length.
        envelope: [E] smooth cutoff u(r).
        num_nodes: N.
    """

    src: torch.Tensor
    dst: torch.Tensor
    rot: torch.Tensor
    radial: torch.Tensor
    envelope: torch.Tensor
    num_nodes: int
    _incidence: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def incidence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order [2, E], start [2, N + 1]): the edges sorted by src and by dst, and where each node's edges begin
        in those orders (:func:`potentials.accel.ops.incidence`, computed once per forward pass)."""
        if self._incidence is None:
            self._incidence = ops.incidence(self.src, self.dst, self.num_nodes)
        return self._incidence


def envelope_softmax(logits: torch.Tensor, envelope: torch.Tensor, index: torch.Tensor, num_nodes: int
                     ) -> torch.Tensor:
    """Softmax of ``logits`` [E, H] over the edges sharing a centre, each term weighted by ``envelope`` [E].

    Returns u·exp(a) / Σ u·exp(a) per centre and head ([E, H]); terms with u = 0 get weight 0 (and a centre whose
    edges all have u = 0 gets all-zero weights).  The per-centre shift (the largest a + log u, detached) cancels
    exactly and only keeps the exponentials in range.
    """
    log_u = torch.log(envelope.detach().clamp_min(1e-30)).unsqueeze(-1)
    shift = scatter(logits.detach() + log_u, index, dim=0, dim_size=num_nodes, reduce="max")
    w = torch.exp(logits - shift.index_select(0, index)) * envelope.unsqueeze(-1)
    total = torch.zeros_like(shift).index_add_(0, index, w)
    return w / (total.index_select(0, index) + 1e-30)


def edge_scalars(radial: torch.Tensor, z: torch.Tensor, edge: EdgeData, source: nn.Embedding,
                 target: nn.Embedding) -> torch.Tensor:
    """Invariant edge features [E, num_basis + 2·F]: radial basis and embeddings of both elements."""
    return torch.cat([radial, source(z[edge.src]), target(z[edge.dst])], dim=-1)


def gather_pairs(x: torch.Tensor, edge: EdgeData) -> torch.Tensor:
    """[x_j, x_i] per edge j → i: node features [N, K, C] → [E, K, 2C] (source channels first)."""
    return ops.gather_pairs(x, edge.src, edge.dst)


def rotated_pairs(x: torch.Tensor, edge: EdgeData, row_first: torch.Tensor, row_length: torch.Tensor
                  ) -> torch.Tensor:
    """Edge-frame coefficients of [x_j, x_i] per edge j → i: bmm(edge.rot, gather_pairs(x, edge)), [E, R, 2C].

    ``row_first``, ``row_length`` [R]: the columns of each row of ``edge.rot`` inside its degree's block.
    """
    return ops.rotate_pairs(x, edge.rot, edge.src, edge.dst, row_first, row_length, edge.incidence)


def rotated_back_sum(msg: torch.Tensor, edge: EdgeData, row_first: torch.Tensor, row_length: torch.Tensor
                     ) -> torch.Tensor:
    """Edge-frame messages [E, R, C] rotated back and summed into their centres: [N, (lmax+1)², C]."""
    return ops.rotate_back_sum(msg, edge.rot, edge.dst, edge.num_nodes, row_first, row_length, edge.incidence)


def _atom_edge_embeddings(num_elements: int, width: int) -> tuple[nn.Embedding, nn.Embedding]:
    source, target = nn.Embedding(num_elements, width), nn.Embedding(num_elements, width)
    nn.init.uniform_(source.weight, -1e-3, 1e-3)
    nn.init.uniform_(target.weight, -1e-3, 1e-3)
    return source, target


class SO2GraphAttention(nn.Module):
    """Equivariant graph attention: node features [N, (lmax+1)², C] → [N, (lmax+1)², C_out].

    For each edge j → i: concatenate x_j and x_i, rotate into the edge frame, SO(2) convolution (radial-modulated)
    that also yields attention logits and gate scalars, separable S² activation, second SO(2) convolution giving
    H heads of values; weights: LayerNorm on each head's logit features ("attention re-normalisation"), smooth
    leaky ReLU, dot with a learned vector, envelope-weighted softmax over the centre's edges; rotate back, sum over
    edges, degree-wise linear projection.

    Args:
        layout: kept edge-frame coefficients (lmax, mmax).
        grid: S² grid on the edge layout for the activation.
        channels: input channels C.
        hidden_channels: channels of the first convolution's output.
        num_heads, alpha_channels, value_channels: heads H, logit features per head, value channels per head.
        out_channels: output channels.
        radial_sizes: [num_basis, hidden, hidden] widths of the radial MLP (atom embeddings are appended).
        num_elements: size of the element embeddings.
        use_attn_renorm: apply the LayerNorm to the logit features.
        alpha_drop: dropout on attention weights (training only).
        use_gate_act: gate activation instead of the separable S² activation (exactly equivariant; ``grid`` unused).
    """

    def __init__(self, layout: EdgeLayout, grid: S2Grid | None, channels: int, hidden_channels: int, num_heads: int,
                 alpha_channels: int, value_channels: int, out_channels: int, radial_sizes: list[int],
                 num_elements: int = 119, use_attn_renorm: bool = True, alpha_drop: float = 0.0,
                 use_gate_act: bool = False) -> None:
        super().__init__()
        self.num_heads, self.alpha_channels, self.value_channels = num_heads, alpha_channels, value_channels
        self.source_embedding, self.target_embedding = _atom_edge_embeddings(num_elements, radial_sizes[-1])
        sizes = [radial_sizes[0] + 2 * radial_sizes[-1], *radial_sizes[1:]]
        n_gate = layout.lmax * hidden_channels if use_gate_act else hidden_channels
        self.conv_1 = SO2Convolution(layout, 2 * channels, hidden_channels,
                                     extra_m0_channels=num_heads * alpha_channels + n_gate, radial_sizes=sizes)
        if use_gate_act:
            row_degrees = torch.tensor([l for l, _ in layout.rows], dtype=torch.long)
            self.activation = GateActivation(layout.lmax, row_degrees)
        elif grid is not None:
            self.activation = SeparableS2Activation(grid)
        else:
            raise ValueError("the S² activation needs an edge-frame grid (or set use_gate_act=True)")
        self.conv_2 = SO2Convolution(layout, hidden_channels, num_heads * value_channels)
        self.alpha_norm = nn.LayerNorm(alpha_channels) if use_attn_renorm else nn.Identity()
        self.alpha_act = SmoothLeakyReLU(0.2)
        bound = 1.0 / math.sqrt(alpha_channels)
        self.alpha_dot = nn.Parameter(torch.empty(num_heads, alpha_channels).uniform_(-bound, bound))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else nn.Identity()
        self.proj = DegreeLinear(layout.lmax, num_heads * value_channels, out_channels)
        degrees = torch.tensor([l for l, _ in layout.rows], dtype=torch.long)
        self.register_buffer("row_first", degrees * degrees, persistent=False)
        self.register_buffer("row_length", 2 * degrees + 1, persistent=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor, edge: EdgeData) -> torch.Tensor:
        """x [N, (lmax+1)², C], z [N] → [N, (lmax+1)², C_out]."""
        n_edges, node_values = edge.src.shape[0], x.numel()
        x = accel.mark_steps(x, 2 * n_edges * x.shape[1] * x.shape[2])  # edge-wise steps from here on
        scalars = edge_scalars(edge.radial, z, edge, self.source_embedding, self.target_embedding)
        msg = rotated_pairs(x, edge, self.row_first, self.row_length)
        msg, extra = self.conv_1(msg, scalars)
        n_alpha = self.num_heads * self.alpha_channels
        msg = self.activation(extra[:, n_alpha:], msg)
        msg, _ = self.conv_2(msg)
        # attention weights: a chain of small steps on [E, H, A] and [E, H] (one thread where that is faster)
        feats = accel.mark_steps(extra[:, :n_alpha].reshape(n_edges, self.num_heads, self.alpha_channels))
        feats = self.alpha_act(self.alpha_norm(feats))
        logits = torch.einsum("eha,ha->eh", feats, self.alpha_dot)
        weight = envelope_softmax(logits, edge.envelope, edge.dst, edge.num_nodes)
        weight = self.alpha_dropout(weight) * edge.envelope.unsqueeze(-1)
        weight = accel.mark_steps(weight, msg.numel())
        n_rows = msg.shape[1]
        msg = msg.reshape(n_edges, n_rows, self.num_heads, self.value_channels) * weight[:, None, :, None]
        msg = msg.reshape(n_edges, n_rows, self.num_heads * self.value_channels)
        out = rotated_back_sum(msg, edge, self.row_first, self.row_length)
        return self.proj(accel.mark_steps(out, node_values))


class EdgeDegreeEmbedding(nn.Module):
    """Initial equivariant features from the neighbourhood: Σ_j u(r_ij)·D(Q_ij)ᵀ·[w_l(r_ij, z_i, z_j) at m = 0] / ⟨n⟩.

    A radial MLP gives one weight per (degree, channel) placed at m = 0 in each edge's frame and rotated back, i.e.
    w_l(r)·Y_l(r̂) up to normalisation; summed over neighbours and divided by the average neighbour count.
    """

    def __init__(self, lmax: int, channels: int, radial_sizes: list[int], num_elements: int = 119,
                 avg_num_neighbors: float = 1.0) -> None:
        super().__init__()
        self.lmax, self.channels = int(lmax), int(channels)
        self.source_embedding, self.target_embedding = _atom_edge_embeddings(num_elements, radial_sizes[-1])
        sizes = [radial_sizes[0] + 2 * radial_sizes[-1], *radial_sizes[1:], (lmax + 1) * channels]
        self.radial = RadialMLP(sizes)
        self.norm = 1.0 / float(avg_num_neighbors)

    def forward(self, z: torch.Tensor, edge: EdgeData) -> torch.Tensor:
        """z [N] → [N, (lmax+1)², C]."""
        scalars = edge_scalars(edge.radial, z, edge, self.source_embedding, self.target_embedding)
        w = self.radial(scalars).reshape(scalars.shape[0], self.lmax + 1, self.channels)
        w = w * (edge.envelope * self.norm)[:, None, None]
        # the m = 0 rows of the edge layout are its first lmax+1 rows, degrees 0 … lmax in order
        msg = torch.bmm(edge.rot[:, : self.lmax + 1].transpose(1, 2), w)
        return msg.new_zeros(edge.num_nodes, *msg.shape[1:]).index_add_(0, edge.dst, msg)
