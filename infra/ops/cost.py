"""What an environment costs per hour and per month on AWS, against what the source document says its
hardware costs.

Prices are us-east-1 on-demand LIST prices (no savings plans, reservations or spot, no tax, no data
transfer) as of the date below. Instance prices come from infra/catalog/sizes.py (the one catalog of
instance types); the other services' prices are here. The source document's purchase price per size
(`Size.source_capex_cny`) gives the break-even: how many months of running the environment around the
clock cost as much as buying the source document's hardware (purchase price only: the source document
gives no power, hosting or staff figures).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.catalog.environments import Environment
from infra.catalog.sizes import INSTANCE_TYPES, PRICES_AS_OF, SYSTEM_INSTANCE_TYPES, HotTierKind

HOURS_PER_MONTH = 730  # AWS's own convention for monthly estimates

#: Date and source of SERVICE_PRICES (instance prices: infra.catalog.sizes.PRICES_AS_OF).
SERVICE_PRICES_AS_OF = "2025-07, us-east-1 list prices from the AWS pricing pages of EKS, VPC, FSx, S3, AMP, EBS"
SERVICE_PRICES = {
    "eks_cluster_hour": 0.10,  # standard support; extended support is 0.60
    "nat_gateway_hour": 0.045,  # plus 0.045 per GB processed (traffic-dependent, not included)
    "s3_standard_gb_month": 0.023,  # first 50 TB
    "amp_per_million_samples": 0.09,  # ingestion, first 2 billion samples a month ($0.90 per 10 M)
    "ebs_gp3_gb_month": 0.08,
    "ebs_gp3_mbps_month": 0.04,  # provisioned throughput above the free 125 MB/s
}
#: FSx for Lustre PERSISTENT_2, per GB-month of capacity, by throughput tier (MB/s per TiB).
FSX_GB_MONTH = {125: 0.145, 250: 0.21, 500: 0.34, 1000: 0.60}
#: Yuan per US dollar for the source document's capex (2025-07 average, rounded).
CNY_PER_USD = 7.17

# Usage assumptions (not prices): what the estimate counts, in one place.
#: Revisions kept in the cold tier (current + one noncurrent), each the size's checkpoint (Size.pod.model_gb).
COLD_REVISIONS = 2
#: Active Prometheus series per node (node exporter, kubelet/cAdvisor, DCGM per GPU, the runtime's
#: histograms), scraped every 30 s into AMP.
SERIES_PER_NODE = 1_000
SERIES_PER_GPU = 150
SCRAPE_INTERVAL_S = 30
EBS_FREE_MBPS = 125


@dataclass(frozen=True)
class Line:
    item: str
    quantity: str
    usd_per_hour: float
    scales_to_zero: bool = False  # GPU nodes: the pools start at 0 and the workload scales them

    @property
    def usd_per_month(self) -> float:
        return self.usd_per_hour * HOURS_PER_MONTH


@dataclass(frozen=True)
class CostEstimate:
    environment: str
    size: str
    lines: list[Line]
    source_hardware: str
    source_capex_cny: int

    @property
    def hourly(self) -> float:
        return sum(line.usd_per_hour for line in self.lines)

    @property
    def monthly(self) -> float:
        return self.hourly * HOURS_PER_MONTH

    @property
    def idle_monthly(self) -> float:
        """With the GPU pool at zero nodes (the default after deploy)."""
        return sum(line.usd_per_month for line in self.lines if not line.scales_to_zero)

    @property
    def source_capex_usd(self) -> float:
        return self.source_capex_cny / CNY_PER_USD

    @property
    def break_even_months(self) -> float:
        """Months of serving around the clock that cost the source document's purchase price."""
        return self.source_capex_usd / self.monthly


def _monthly(usd_per_month: float) -> float:
    return usd_per_month / HOURS_PER_MONTH


def estimate(env: Environment) -> CostEstimate:
    """Serving cost of one environment: every replica of its size up, 24/7."""
    size = env.size_spec
    it = INSTANCE_TYPES[env.gpu_instance_type]
    gpu_nodes = size.gpu_nodes(env.gpu_instance_type)
    system_type, system_nodes = size.system_instance_type, size.system_nodes[1]
    nats = 1 if env.single_nat_gateway else len(env.azs)
    p = SERVICE_PRICES
    lines = [
        Line(f"GPU nodes ({it.gpu_model})", f"{gpu_nodes} × {it.name}", gpu_nodes * it.usd_per_hour, True),
        Line("system nodes", f"{system_nodes} × {system_type}", system_nodes * SYSTEM_INSTANCE_TYPES[system_type]),
        Line("EKS control plane", "1 cluster", p["eks_cluster_hour"]),
        Line("NAT gateways", f"{nats} (+ $0.045/GB processed)", nats * p["nat_gateway_hour"]),
    ]
    storage = size.storage
    if storage.hot_kind is HotTierKind.FSX_LUSTRE:
        tier = storage.fsx_throughput_per_tib or 250
        tib = storage.hot_capacity_gib / 1024
        lines.append(
            Line(
                "FSx for Lustre (hot tier)",
                f"{tib:.1f} TiB × ${FSX_GB_MONTH[tier] * 1024:.0f}/TiB-month ({tier} MB/s/TiB)",
                _monthly(storage.hot_capacity_gib * FSX_GB_MONTH[tier]),
            )
        )
    else:
        extra_mbps = max(0, storage.hot_read_mb_s - EBS_FREE_MBPS)
        lines.append(
            Line(
                "EBS gp3 (hot tier)",
                f"{storage.hot_capacity_gib} GB, {storage.hot_read_mb_s} MB/s",
                _monthly(storage.hot_capacity_gib * p["ebs_gp3_gb_month"] + extra_mbps * p["ebs_gp3_mbps_month"]),
            )
        )
    for role, nodes in (("GPU", gpu_nodes), ("system", system_nodes)):
        gb = nodes * size.root_volume_gib
        lines.append(
            Line(f"EBS gp3 ({role} node root volumes)", f"{gb} GB", _monthly(gb * p["ebs_gp3_gb_month"]), role == "GPU")
        )
    cold_gb = size.pod.model_gb * COLD_REVISIONS
    lines.append(
        Line(
            "S3 (cold tier)",
            f"{cold_gb} GB × ${p['s3_standard_gb_month']}/GB-month",
            _monthly(cold_gb * p["s3_standard_gb_month"]),
        )
    )
    series = (gpu_nodes + system_nodes) * SERIES_PER_NODE + gpu_nodes * it.gpus * SERIES_PER_GPU
    samples_m = series * HOURS_PER_MONTH * 3600 / SCRAPE_INTERVAL_S / 1e6
    lines.append(
        Line(
            "AMP samples ingested",
            f"{samples_m:,.0f} M/month ({series:,} series @ {SCRAPE_INTERVAL_S} s)",
            _monthly(samples_m * p["amp_per_million_samples"]),
        )
    )
    return CostEstimate(env.name, size.name.value, lines, size.source_hardware, size.source_capex_cny)


def price_note() -> str:
    return (
        f"List prices, not a quote: instances {PRICES_AS_OF}; services {SERVICE_PRICES_AS_OF}. "
        f"Capex converted at {CNY_PER_USD} CNY/USD; break-even = source document's capex ÷ monthly serving cost."
    )
