"""Cluster and MoE descriptions for the cost model, with presets.

Bandwidths are GB/s (1e9 bytes/s) per direction per GPU; latencies in microseconds.

Preset sources (public datasheets; "usable" values where DeepSeek/DeepEP published measurements):

- H800: NVLink cut to ~160 GB/s usable per direction (DeepEP), 400 Gb/s CX7 InfiniBand ~50 GB/s per GPU.
- H100 / H200: NVLink 4 at 450 GB/s per direction, 400 Gb/s NIC per GPU (~50 GB/s).
- B200: NVLink 5 at 900 GB/s per direction, 800 Gb/s NIC per GPU (~100 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Cluster", "MoEShape", "PRESETS", "DEEPSEEK_V3"]


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Hardware of an expert-parallel group.

    Attributes:
        name: label.
        gpus_per_node: G.
        nodes: N (EP size = G * N).
        nvlink_gbps: NVLink bandwidth per GPU per direction.
        nic_gbps: RDMA bandwidth per GPU per direction.
        nvlink_latency_us / rdma_latency_us: one-way latency of a small message.
        hbm_gbps: device memory bandwidth (read + write).
        sm_count: streaming multiprocessors per GPU.
    """

    name: str
    gpus_per_node: int = 8
    nodes: int = 1
    nvlink_gbps: float
    nic_gbps: float
    nvlink_latency_us: float = 3.0
    rdma_latency_us: float = 6.0
    hbm_gbps: float
    sm_count: int = 132

    @property
    def ep_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def with_nodes(self, nodes: int) -> Cluster:
        return replace(self, nodes=nodes)


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """One MoE layer's traffic.

    Attributes:
        tokens_per_rank: T.
        hidden: H.
        topk: K experts per token.
        num_experts: E (divisible by the EP size).
        node_limit: M, the most nodes a token's experts may span (DeepSeek-V3: 4); 0 = no limit.
        fp8_dispatch: dispatch payload is FP8 with one float32 scale per 128 channels (else bf16).
    """

    tokens_per_rank: int = 4096
    hidden: int = 7168
    topk: int = 8
    num_experts: int = 256
    node_limit: int = 4
    fp8_dispatch: bool = True

    @property
    def dispatch_row_bytes(self) -> float:
        """Bytes of one dispatched token: FP8 values plus scales, or bf16."""
        return self.hidden + 4 * self.hidden / 128 if self.fp8_dispatch else 2.0 * self.hidden

    @property
    def combine_row_bytes(self) -> float:
        """Bytes of one combined (bf16) row."""
        return 2.0 * self.hidden


PRESETS: dict[str, Cluster] = {
    "h800": Cluster(name="H800", nvlink_gbps=160.0, nic_gbps=50.0, hbm_gbps=3350.0, sm_count=132),
    "h100": Cluster(name="H100", nvlink_gbps=450.0, nic_gbps=50.0, hbm_gbps=3350.0, sm_count=132),
    "h200": Cluster(name="H200", nvlink_gbps=450.0, nic_gbps=50.0, hbm_gbps=4800.0, sm_count=132),
    "b200": Cluster(name="B200", nvlink_gbps=900.0, nic_gbps=100.0, hbm_gbps=8000.0, sm_count=148),
}

DEEPSEEK_V3 = MoEShape()
