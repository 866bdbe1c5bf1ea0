"""Communication cost model for planning at cluster scale: ``python -m moe_comm.model``.

Entry points: :func:`layer_traffic` (bytes per link and time of one dispatch/combine), :func:`sms_to_saturate`,
:func:`validate_deepep` (against DeepEP's published H800 table), :func:`estimate_schedules` (pipeline step time
and exposed communication through dualpipe's simulator). Presets: :data:`PRESETS` (H800, H100, H200, B200).
"""

from moe_comm.model.pipeline import PipelineEstimate, estimate_schedules
from moe_comm.model.topology import DEEPSEEK_V3, PRESETS, Cluster, MoEShape
from moe_comm.model.traffic import HitRates, LinkTraffic, hit_rates, layer_traffic, sms_to_saturate
from moe_comm.model.validation import ASSUMPTIONS, Comparison, low_latency_time_us, validate_deepep

__all__ = [
    # entry points
    "layer_traffic",
    "sms_to_saturate",
    "validate_deepep",
    "estimate_schedules",
    # descriptions and results
    "Cluster",
    "MoEShape",
    "PRESETS",
    "DEEPSEEK_V3",
    "HitRates",
    "LinkTraffic",
    "hit_rates",
    "Comparison",
    "ASSUMPTIONS",
    "low_latency_time_us",
    "PipelineEstimate",
]
