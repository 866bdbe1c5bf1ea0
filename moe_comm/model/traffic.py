"""Expected bytes per link and time of dispatch and combine, and the SMs needed to saturate the bottleneck.

Routing model (uniform): a token first picks M of the N nodes uniformly (node-limited routing; all N when
M = 0 or M >= N), then K distinct experts uniformly among the experts of those nodes. A token is sent once
to every rank (and, with hierarchical forwarding, once to every node) holding at least one of its experts.
The probabilities are exact (hypergeometric): the chance that a set of ``a`` experts out of ``n`` candidates
receives none of K picks is ``C(n - a, K) / C(n, K)``.

A measured per-expert load replaces the uniform picks: ``expert_load[e]`` is the expected number of this
layer's tokens choosing expert ``e`` per token (summing to K); rank/node hit probabilities then use a
Poisson approximation ``1 - exp(-load)`` of the chance of at least one pick.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from moe_comm.model.topology import Cluster, MoEShape

__all__ = ["HitRates", "LinkTraffic", "hit_rates", "layer_traffic", "sms_to_saturate"]


def _none_hit(candidates: int, held: int, picks: int) -> float:
    """P(no pick lands in ``held`` of ``candidates`` experts) with ``picks`` draws without replacement."""
    if picks > candidates - held:
        return 0.0
    return math.comb(candidates - held, picks) / math.comb(candidates, picks)


@dataclass(frozen=True)
class HitRates:
    """Expected destinations of one token.

    Attributes:
        rank: P(a given other rank receives the token) (the same for every rank under uniform routing).
        node: P(a given node receives the token).
        ranks_per_token: expected distinct ranks reached (own rank included).
        nodes_per_token: expected distinct nodes reached (own node included).
    """

    rank: float
    node: float
    ranks_per_token: float
    nodes_per_token: float


def hit_rates(cluster: Cluster, shape: MoEShape, expert_load: Sequence[float] | None = None) -> HitRates:
    """Probabilities that a token reaches a given rank and node (see the module docstring)."""
    ranks, nodes, g = cluster.ep_size, cluster.nodes, cluster.gpus_per_node
    if shape.num_experts % ranks:
        raise ValueError(f"num_experts: {shape.num_experts} is not divisible by the EP size {ranks}")
    per_rank = shape.num_experts // ranks
    if expert_load is not None:
        if len(expert_load) != shape.num_experts:
            raise ValueError(f"expert_load: expected {shape.num_experts} entries, got {len(expert_load)}")
        rank_load = [sum(expert_load[r * per_rank : (r + 1) * per_rank]) for r in range(ranks)]
        node_load = [sum(rank_load[n * g : (n + 1) * g]) for n in range(nodes)]
        p_rank = [1 - math.exp(-x) for x in rank_load]
        p_node = [1 - math.exp(-x) for x in node_load]
        return HitRates(sum(p_rank) / ranks, sum(p_node) / nodes, sum(p_rank), sum(p_node))
    m = nodes if shape.node_limit <= 0 else min(shape.node_limit, nodes)
    candidates = m * g * per_rank
    p_node_selected = m / nodes
    p_rank = p_node_selected * (1 - _none_hit(candidates, per_rank, shape.topk))
    p_node = p_node_selected * (1 - _none_hit(candidates, g * per_rank, shape.topk))
    return HitRates(p_rank, p_node, p_rank * ranks, p_node * nodes)


@dataclass(frozen=True)
class LinkTraffic:
    """Per GPU, one direction of one MoE layer (dispatch or combine).

    Attributes:
        op: "dispatch" or "combine".
        nvlink_bytes: bytes this GPU sends over NVLink.
        rdma_bytes: bytes this GPU sends over its NIC.
        logical_bytes: bytes of all rows it receives, its own rows included (DeepEP's intranode count).
        rdma_counted_bytes: token rows per destination node including its own node (DeepEP's internode count).
        time_us: max over links of bytes / bandwidth, plus one latency of the slowest link used.
        bottleneck: "nvlink" or "rdma".
    """

    op: str
    nvlink_bytes: float
    rdma_bytes: float
    logical_bytes: float
    rdma_counted_bytes: float
    time_us: float
    bottleneck: str

    def algorithmic_gbps(self) -> float:
        """Bandwidth the way DeepEP reports it: counted bytes over time (NVLink bytes intranode, RDMA internode)."""
        counted = self.logical_bytes if self.rdma_bytes == 0 else self.rdma_counted_bytes
        return counted / (self.time_us * 1e-6) / 1e9


def layer_traffic(
    cluster: Cluster,
    shape: MoEShape,
    op: str = "dispatch",
    *,
    hierarchical: bool = True,
    expert_load: Sequence[float] | None = None,
    link_efficiency: float = 1.0,
) -> LinkTraffic:
    """Expected traffic of one dispatch or combine on each GPU.

    Args:
        cluster: the hardware.
        shape: the MoE layer.
        op: "dispatch" (FP8 or bf16 rows out) or "combine" (bf16 rows back; same pattern reversed).
        hierarchical: internode tokens cross RDMA once per destination node (to the same-index GPU) and are
            forwarded over NVLink there (DeepEP); else once per destination rank.
        expert_load: measured per-expert load (see module docstring) instead of uniform routing.
        link_efficiency: fraction of each link's bandwidth that transfers achieve (1.0 = the ideal).
    """
    if op not in ("dispatch", "combine"):
        raise ValueError(f"op: expected 'dispatch' or 'combine', got {op!r}")
    hits = hit_rates(cluster, shape, expert_load)
    row = shape.dispatch_row_bytes if op == "dispatch" else shape.combine_row_bytes
    t = shape.tokens_per_rank
    g, n = cluster.gpus_per_node, cluster.nodes
    local_peers = g - 1
    remote_nodes = n - 1
    remote_ranks = g * (n - 1)
    if n == 1:
        nvlink = t * local_peers * hits.rank * row
        rdma = 0.0
    elif hierarchical:
        rdma = t * remote_nodes * hits.node * row
        # Intranode: tokens for local peers, plus forwarding what other nodes' same-index GPUs sent here.
        nvlink = t * local_peers * hits.rank * row + rdma * (g - 1) / g
    else:
        rdma = t * remote_ranks * hits.rank * row
        nvlink = t * local_peers * hits.rank * row
    nv_time = nvlink / (cluster.nvlink_gbps * 1e9 * link_efficiency)
    rd_time = rdma / (cluster.nic_gbps * 1e9 * link_efficiency) if rdma else 0.0
    bottleneck = "rdma" if rd_time > nv_time else "nvlink"
    latency = cluster.rdma_latency_us if rdma else cluster.nvlink_latency_us
    time_us = max(nv_time, rd_time) * 1e6 + latency
    logical = t * hits.ranks_per_token * row
    counted = t * hits.nodes_per_token * row if n > 1 else logical
    return LinkTraffic(op, nvlink, rdma, logical, counted, time_us, bottleneck)


def sms_to_saturate(traffic: LinkTraffic, cluster: Cluster, per_sm_copy_gbps: float = 25.0) -> int:
    """SMs whose copy rate together reaches the bottleneck link's bandwidth.

    ``per_sm_copy_gbps`` is the rate at which one SM moves payload (read + remote write). The default, 25 GB/s,
    is an assumption (DeepEP reaches ~153 GB/s of NVLink with ~20 SMs including receivers, i.e. ~8-16 GB/s per
    SM of each role); replace it with the number ``python -m moe_comm.bench --suite cuda`` measures.
    """
    link = cluster.nic_gbps if traffic.bottleneck == "rdma" else cluster.nvlink_gbps
    return max(1, math.ceil(link / per_sm_copy_gbps))
