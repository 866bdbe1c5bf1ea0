"""Step time, bubble and exposed communication of pipeline schedules with EP communication.

Uses :mod:`dualpipe`'s generators and simulator. Per chunk (one stage, one micro-batch): forward compute F,
backward B (of which weight-grad W), and the EP communication of the chunk's MoE layers: ``comm_f`` in the
forward (dispatch + combine per layer) and ``comm_b`` in the backward (the same, reversed).

- 1F1B and ZB1P do not overlap communication with computation: F' = F + comm_f, B' = B + comm_b (I' = B' - W).
- DualPipe and DualPipeV overlap one micro-batch's forward with another's backward; the communication runs on
  ``comm_sms`` SMs while the other SMs compute, so an overlapped pair takes
  ``max((F + B) * sm_total / (sm_total - comm_sms), comm_f + comm_b)``; their non-overlapped F/B (warm-up and
  cool-down) pay the communication in full as above.

Exposed communication = step time with communication - step time with free communication, same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualpipe import Costs, generate, simulate

__all__ = ["PipelineEstimate", "estimate_schedules"]


@dataclass(frozen=True)
class PipelineEstimate:
    """One schedule's estimate (times in the unit of the inputs)."""

    schedule: str
    step_time: float
    bubble: float
    exposed_comm: float
    peak_activations: int


def _costs(name: str, F: float, B: float, W: float, comm_f: float, comm_b: float, sm_total: int, comm_sms: int) -> Costs:
    if name in ("dualpipe", "dualpipev"):
        slowed = (F + B) * sm_total / max(sm_total - comm_sms, 1)
        return Costs(F=F + comm_f, B=B + comm_b, W=W, FB=max(slowed, comm_f + comm_b))
    return Costs(F=F + comm_f, B=B + comm_b, W=W)


def estimate_schedules(
    *,
    pp: int,
    num_chunks: int,
    F: float,
    B: float,
    W: float,
    comm_f: float,
    comm_b: float,
    sm_total: int = 132,
    comm_sms: int = 20,
    schedules: tuple[str, ...] = ("1f1b", "zb1p", "dualpipe", "dualpipev"),
) -> list[PipelineEstimate]:
    """Simulate each schedule with and without communication.

    Args:
        pp: pipeline ranks (GPUs in a pipeline); DualPipeV runs 2 * pp half-size stages on them.
        num_chunks: micro-batches per step.
        F, B, W: per-chunk forward, full backward and weight-grad compute times.
        comm_f, comm_b: per-chunk EP communication in the forward and in the backward.
        sm_total, comm_sms: SMs per GPU and SMs given to communication in the overlapped schedules.
    """
    out = []
    for name in schedules:
        # DualPipeV cuts each of the pp ranks' layers into two stages (2 * pp stages of half the work), so every
        # schedule here runs the same model on the same pp GPUs.
        scale = 0.5 if name == "dualpipev" else 1.0
        plan = generate(name, pp, num_chunks)
        f, b, w, cf, cb = (scale * v for v in (F, B, W, comm_f, comm_b))
        with_comm = simulate(plan, _costs(name, f, b, w, cf, cb, sm_total, comm_sms))
        free = simulate(plan, _costs(name, f, b, w, 0.0, 0.0, sm_total, 0))
        out.append(
            PipelineEstimate(name, with_comm.makespan, with_comm.max_bubble, with_comm.makespan - free.makespan, max(with_comm.peak_activations))
        )
    return out
