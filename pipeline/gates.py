"""Gate checks and selection: pure functions over measured figures, so they are easy to test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipeline.config import MIN_SPEEDUP, Gates
from pipeline.fidelity import Fidelity
from pipeline.ranking import Timing
from pipeline.state import Evaluation, Measurement, Verdict

RSS_TIE = 0.02  # peak RSS repeats within ~1% here; 2% apart is not a real difference
# Fidelity scores (mean cosine, or agreement) closer than this are tied: a tenth of the 0.005 of mean
# cosine the default gate lets a candidate lose. mpnet's two 8-bit-weight candidates with int8 compute,
# tied on peak (519.1 and 519.3 MB), were told apart by 0.9998 against 0.9997: a fourth decimal that
# decides nobody's results, so the configured order decides instead.
FIDELITY_TIE = 0.0005


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
    """Task-metric (labelled data only) and fidelity gates missed on the test split."""
    failures = []
    metric = evaluation.accuracy
    if metric is not None and -metric["delta"] > gates.max_metric_drop_pt:
        failures.append(f"{metric['metric']} drop {-metric['delta']:.2f} pt > {gates.max_metric_drop_pt} pt")
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
    timings: dict[str, Timing],
    min_speedup: float = MIN_SPEEDUP,
) -> tuple[Verdict, ...]:
    """A verdict per eligible candidate; the passing one that best meets `objective` is chosen, and each
    passing one carries why it was or was not (`timings`: pipeline/ranking.py, for every passing one)."""
    verdicts = [
        Verdict(name, gate_failures(evaluations[name], measurements[name], gates, share_mb)) for name in eligible
    ]
    passing = [v.variant for v in verdicts if v.passed]
    if not passing:
        return tuple(verdicts)
    chosen, notes, deciders = rank(passing, evaluations, measurements, objective, timings, min_speedup)
    return tuple(
        replace(v, chosen=v.variant == chosen, note=notes.get(v.variant, ""), decides=v.variant in deciders)
        for v in verdicts
    )


def fidelity_score(evaluation: Evaluation) -> float:
    """The one fidelity figure every task has: mean cosine to fp32 (embeddings), else top-1 agreement."""
    fidelity = evaluation.fidelity
    score = fidelity.cosine_mean if fidelity.cosine_mean is not None else fidelity.agreement
    if score is None:
        raise ValueError("an evaluation without fidelity figures")
    return score


def rank(
    passing: list[str],
    evaluations: dict[str, Evaluation],
    measurements: dict[str, Measurement],
    objective: str,
    timings: dict[str, Timing],
    min_speedup: float,
) -> tuple[str, dict[str, str], set[str]]:
    """The chosen candidate, a note per candidate, and the deciders: the candidate each applied criterion
    measured the others against (the fastest, the lowest peak, the most faithful). Criteria in turn, each
    keeping only the candidates tied with the best: speed (pipeline/ranking.py: less than `min_speedup`
    times as fast, or within the spread of interleaved rounds), worst-case peak (within RSS_TIE; memory is
    compared on the same input for all: a candidate that fits only with smaller micro-batches shows a low
    peak there, yet needs more memory for the same work), fidelity (within FIDELITY_TIE); then the
    configured order. `objective` says whether speed or memory comes first."""
    notes: dict[str, str] = {}
    deciders: set[str] = set()
    rss = {name: measurements[name].worst_case_peak_mb for name in passing}
    score = {name: fidelity_score(evaluations[name]) for name in passing}

    def by_speed(names: list[str]) -> list[str]:
        fastest = min(names, key=lambda n: timings[n].median_ms)
        deciders.add(fastest)
        for name in names:
            if timings[fastest].faster_than(timings[name], min_speedup):
                notes[name] = f"slower: {timings[name].describe()} vs {fastest} {timings[fastest].describe()}"
        return [n for n in names if n not in notes]

    def by_memory(names: list[str]) -> list[str]:
        lowest = min(names, key=lambda n: rss[n])
        deciders.add(lowest)
        for name in names:
            if rss[name] > rss[lowest] * (1 + RSS_TIE):
                notes[name] = f"worst-case peak {rss[name]:.1f} MB vs {lowest} {rss[lowest]:.1f} MB"
        return [n for n in names if n not in notes]

    def by_fidelity(names: list[str]) -> list[str]:
        best = max(names, key=lambda n: score[n])
        deciders.add(best)
        for name in names:
            if score[name] < score[best] - FIDELITY_TIE:
                notes[name] = f"less faithful: {score[name]:.4f} vs {best} {score[best]:.4f}"
        return [n for n in names if n not in notes]

    criteria = [by_speed, by_memory] if objective == "lowest_latency" else [by_memory, by_speed]
    remaining = passing
    for criterion in [*criteria, by_fidelity]:
        if len(remaining) == 1:
            break
        remaining = criterion(remaining)
    chosen = remaining[0]  # tied on every criterion: the configured order decides
    for name in remaining[1:]:
        notes[name] = f"tied with {chosen} on speed, memory and fidelity; listed after it"
    speed = f"; {timings[chosen].describe()}" if chosen in timings else ""
    fastest = min(timings, key=lambda n: timings[n].median_ms) if timings else chosen
    if fastest != chosen and not timings[fastest].faster_than(timings[chosen], min_speedup):
        ratio = timings[chosen].median_ms / timings[fastest].median_ms
        why = f"under {min_speedup:g}×" if ratio < min_speedup else "within the rounds' spread"
        speed += f", {ratio:.2f}× {fastest}'s {timings[fastest].describe()}: a tie {why}"
    notes[chosen] = f"best by {objective.replace('_', ' ')}{speed}; worst-case peak {rss[chosen]:.1f} MB"
    return chosen, notes, deciders
