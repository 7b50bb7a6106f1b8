"""Gate checks and selection: pure functions over measured figures, so they are easy to test."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import Gates
from pipeline.fidelity import Fidelity
from pipeline.state import Evaluation, Measurement, Verdict

RSS_TIE = 0.02  # peak RSS repeats within ~1% here; 2% apart is not a real difference
LATENCY_TIE = 0.10  # p50 on a shared 2-core machine drifts by several percent between runs


def fidelity_failures(fidelity: Fidelity, gates: Gates) -> list[str]:
    """The fidelity gates missed; shared by approval and the searches that aim at the same gates."""
    failures = []
    if fidelity.cosine_mean is not None and fidelity.cosine_mean < gates.min_mean_cosine:
        failures.append(f"mean cosine {fidelity.cosine_mean:.4f} < {gates.min_mean_cosine}")
    if fidelity.overlap_at_10 is not None and fidelity.overlap_at_10 < gates.min_overlap_at_10:
        failures.append(f"overlap@10 {fidelity.overlap_at_10:.3f} < {gates.min_overlap_at_10}")
    if fidelity.agreement is not None and fidelity.agreement < gates.min_agreement:
        failures.append(f"agreement with fp32 {fidelity.agreement:.4f} < {gates.min_agreement}")
    return failures


def evaluation_failures(evaluation: Evaluation, gates: Gates) -> list[str]:
    """Accuracy and fidelity gates missed on the test split."""
    failures = []
    drop = -evaluation.accuracy["delta"]
    if drop > gates.max_metric_drop_pt:
        failures.append(f"{evaluation.accuracy['metric']} drop {drop:.2f} pt > {gates.max_metric_drop_pt} pt")
    return failures + fidelity_failures(evaluation.fidelity, gates)


def gate_failures(evaluation: Evaluation, measurement: Measurement, gates: Gates, share_mb: float) -> tuple[str, ...]:
    """One readable reason per gate the candidate misses (empty when it passes every gate)."""
    failures = evaluation_failures(evaluation, gates)
    if measurement.peak_rss_mb > share_mb:
        failures.append(
            f"peak RSS {measurement.peak_rss_mb:.0f} MB > share {share_mb:.0f} MB "
            f"at {measurement.batch}x{measurement.seq_len} tokens"
        )
    return tuple(failures)


def select(
    eligible: Sequence[str],
    evaluations: dict[str, Evaluation],
    measurements: dict[str, Measurement],
    gates: Gates,
    share_mb: float,
    objective: str,
) -> tuple[Verdict, ...]:
    """A verdict per eligible candidate; the passing one that best meets `objective` is chosen."""
    verdicts = [
        Verdict(name, gate_failures(evaluations[name], measurements[name], gates, share_mb)) for name in eligible
    ]
    passing = [v.variant for v in verdicts if v.passed]
    if not passing:
        return tuple(verdicts)

    # Memory is compared on the same input for all (the whole worst case in one run): a candidate that fits
    # only with smaller micro-batches shows a low peak there, yet needs more memory for the same work.
    rss = {name: measurements[name].worst_case_peak_mb for name in passing}
    p50 = {name: evaluations[name].latency_ms["p50"] for name in passing}
    primary, secondary, margin = (rss, p50, RSS_TIE) if objective == "lowest_peak_rss" else (p50, rss, LATENCY_TIE)
    floor = min(primary.values())
    # Figures within measurement noise of the best count as equal; the other figure decides among them.
    tied = [name for name in passing if primary[name] <= floor * (1 + margin)]
    best = min(tied, key=lambda name: (secondary[name], primary[name]))
    return tuple(Verdict(v.variant, v.failures, chosen=v.variant == best) for v in verdicts)
