"""Plain-text tables of evaluations, validations and attributions (what the commands print)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simfluence.counterfactual import SIGN_CONVENTION
from simfluence.errors import SimfluenceError
from simfluence.evaluation import specs
from simfluence.evaluation.validation_json import ValidationKind, read_validation

if TYPE_CHECKING:
    from simfluence.counterfactual import LeaveOneOut, StepContributions
    from simfluence.evaluation.heldout import EvaluationResult


def failure_message(exc: BaseException, method: str = "") -> str:
    """One line: a user mistake's own message (without a leading ``"method: "``, which the
    caller shows), else the exception's type and message."""
    text = " ".join(str(exc).split())
    if isinstance(exc, SimfluenceError):
        return text.removeprefix(f"{method}: ") if method else text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- held-out evaluation ----------------------------------------------------------------------
def format_table(result: EvaluationResult) -> str:
    """A plain-text table: one row per method, the `specs.METRICS` columns (mean ± std; the
    optional ones only when some method has them)."""
    columns = [
        spec
        for spec in specs.METRICS
        if not spec.optional or any(spec.key in m.scores for m in result.methods.values())
    ]
    header = ["method", *(spec.label for spec in columns)]
    rows = [header]
    for name, method in result.methods.items():
        rows.append([name, *(spec.text(method.scores) for spec in columns)])
    rows += [[name, "failed", *["-"] * (len(header) - 2)] for name in result.failed]
    lines = [_aligned(rows)]
    lines += [f"warning: {w}" for method in result.methods.values() for w in method.warnings]
    lines += [
        f"failed: {name}: {failure_message(exc, name)}" for name, exc in result.failed.items()
    ]
    return "\n".join(lines)


def format_unseen_table(result: EvaluationResult) -> str:
    """All-steps MSE (and 90% coverage, for methods with intervals) per method and unseen-share
    bin of the held-out runs ("" when every held-out run falls in one bin: the main table says
    it all, or when no method worked)."""
    split = result.by_unseen_share()
    bins = [label for _, _, label in specs.UNSEEN_BINS if any(label in s for s in split.values())]
    if len(bins) < 2:
        return ""
    first = next(iter(split.values()))
    header = [f"{specs.metric_label('all_steps_mse')} by unseen share"] + [
        f"{label} ({first[label]['runs']} runs, {100 * first[label]['unseen_share']:.0f}%)"
        for label in bins
    ]
    rows = [header]
    for name, by_bin in split.items():
        cells = []
        for label in bins:
            cell = f"{by_bin[label]['all_steps_mse']:.4g}"
            if "coverage_90" in by_bin[label]:
                cell += f" (cov. {by_bin[label]['coverage_90']:.2f})"
            cells.append(cell)
        rows.append([name, *cells])
    return _aligned(rows)


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- validation against real runs -------------------------------------------------------------
def format_validation(result: dict[str, Any]) -> str:
    """Plain-text tables of a validation (`simfluence.evaluation.validation_json` layout): per
    kind, methods x the `specs.VALIDATION_METRICS` and the mean final loss's interval."""
    validation = read_validation(result)
    lines = []
    for kind in validation.kinds:
        if kind.is_loo:
            lines.extend(_format_loo(kind, validation.timing))
            continue
        lines.append(f"{kind.name} ({kind.info['curricula']} curricula)")
        columns = [(s, max(len(s.label), 6) + 1) for s in specs.VALIDATION_METRICS]
        head = " ".join(f"{s.label:>{w}}" for s, w in columns)
        lines.append(f"  {'method':<18} {head} {'mean final in 90%':>18}")
        for name, s in (kind.methods or {}).items():
            cells = " ".join(f"{spec.text(s):>{w}}" for spec, w in columns)
            inside = s.get("mean_final_in_interval")
            lines.append(
                f"  {name:<18} {cells} "
                + (f"{sum(inside):>11} of {len(inside):<3}" if inside else f"{'-':>18}")
            )
    if validation.optimized is not None:
        lines += _format_optimized(validation.optimized)
    lines += [f"warning: {w}" for ws in validation.warnings.values() for w in ws]
    failed = result.get("failed") or {}
    lines += [f"{name}: not validated, its fit failed: {why}" for name, why in failed.items()]
    for name, kinds in (result.get("unanswered") or {}).items():
        lines += [f"{name}: no answer on the {k} curricula: {why}" for k, why in kinds.items()]
    return "\n".join(lines)


def _format_optimized(o: dict[str, Any]) -> list[str]:
    lines = [
        f"optimized curriculum: actual mean test loss {o['actual_mean_test_loss']:.4f} "
        f"(predicted {o['predicted_mean_test_loss']:.4f}); random curricula: mean "
        f"{sum(o['random_mean_test_losses']) / len(o['random_mean_test_losses']):.4f}, "
        f"min {min(o['random_mean_test_losses']):.4f}; beats "
        f"{100 * o['fraction_of_random_beaten']:.0f}% of them"
    ]
    if "predicted_interval_90" in o:
        low, high = o["predicted_interval_90"]
        where = "inside" if o["actual_in_interval"] else "OUTSIDE"
        lines.append(
            f"the search's own prediction (trust region): "
            f"{o['predicted_mean_test_loss_in_trust_region']:.4f}, 90% interval {low:.4f} to "
            f"{high:.4f}: the actual loss is {where}"
            f" ({sum(o['actual_in_interval_per_search'])} of "
            f"{len(o['actual_in_interval_per_search'])} searches inside)"
        )
    return lines


def _format_loo(kind: ValidationKind, timing: dict[str, Any]) -> list[str]:
    block = kind.info
    seconds = timing.get(kind.name, {})
    methods_seconds = seconds.get("methods", {})
    lines = [
        f"{kind.name} (removal: {block['removal']}; runs {', '.join(block['runs'])}; "
        f"{block['examples']} examples, {block['groups']} group removals; "
        f"{block['retrains']} retrains in {seconds.get('truth_seconds', float('nan')):.1f} s)",
        f"  {'method':<18} {'Spearman':>9} {'Pearson':>8} {'top-10 sign':>12} {'LDS':>7} "
        f"{'size ratio':>11} {'fit s':>7} {'answer s':>9}",
    ]
    for name, s in (kind.methods or {}).items():
        t = methods_seconds.get(name, {})
        if "error" in s:
            lines.append(f"  {name:<18} {s['error']}")
            continue
        lines.append(
            f"  {name:<18} {s['loo_spearman']:>9.3f} {s['loo_pearson']:>8.3f} "
            f"{s['top10_sign_agreement']:>12.2f} {s.get('lds', float('nan')):>7.3f} "
            f"{s['effect_size_ratio']:>11.3g} {t.get('fit_seconds', 0.0):>7.1f} "
            f"{t.get('seconds', float('nan')):>9.1f}"
        )
    if "additive_ceiling_lds" in block:
        lines.append(
            f"  (sum of the actual single removals: LDS {block['additive_ceiling_lds']:.3f})"
        )
    if isinstance(block.get("smoothness"), dict):
        from simfluence.attribution.smoothness import smoothness_line

        lines += [f"  {run}: {smoothness_line(s)}" for run, s in block["smoothness"].items()]
    return lines


# -- attribution ------------------------------------------------------------------------------
def format_attribution(
    loo: LeaveOneOut,
    steps: StepContributions | None,
    pairs: Any,
    source: str,
    n_steps: int,
    top: int,
) -> str:
    """What `simfluence attribute` prints: the leave-one-out effects (most helpful, most
    harmful, with their intervals when calibrated), the steps that mattered most and the pair
    interactions."""
    target = loo.test_ids[0] if len(loo.test_ids) == 1 else f"mean of {len(loo.test_ids)} tests"
    replayed = loo.method in ("unrolled", "dvemb", "combined")
    loss = "recorded loss" if replayed else "simulated loss"
    start = f"{steps.trajectory[0]:.4f} -> " if steps is not None else ""
    lines = [
        f"{target} on {source} ({n_steps} steps, {len(loo.train_ids)} distinct training ids): "
        f"{loss} {start}{loo.final_loss:.4f}",
        f"method: {loo.method}; removal: {loo.removal} "
        + (
            "(the example kept in its batches at weight 0)"
            if loo.removal == "zero-weight"
            else "(dropped, its batch mates re-averaged)"
        ),
        f"sign: {SIGN_CONVENTION}",
    ]
    bounds = {}
    if loo.lower is not None and loo.upper is not None:
        uncertain = loo.uncertain()
        bounds = {
            i: (lo, hi, bool(u))
            for i, lo, hi, u in zip(loo.train_ids, loo.lower, loo.upper, uncertain, strict=True)
        }
        lines.append(
            f"[low, high]: {100 * (loo.level or 0):g}% interval over the calibration refits; "
            f"'~' marks an effect whose interval includes 0 ({int(uncertain.sum())} of "
            f"{uncertain.size}: not even their sign is established)"
        )
    for title, rows in (("most helpful", loo.helpful(top)), ("most harmful", loo.harmful(top))):
        lines.append(f"{title} (leave-one-out):" + ("" if rows else " none"))
        for i, c, e in rows:
            line = f"  {i:<24} x{c:<3} effect {e:+.5f}"
            if i in bounds:
                lo, hi, zero = bounds[i]
                line += f" [{lo:+.5f}, {hi:+.5f}]" + (" ~" if zero else "")
            lines.append(line)
    if steps is not None:
        lines.append(f"steps that mattered most ({steps.unit}):")
        for t in steps.top_steps(min(top, 5)):
            ex = ", ".join(f"{i} {c:+.4f}" for i, c in steps.top_examples(t, 3))
            lines.append(
                f"  step {t:<5} change {steps.change[t - 1]:+.5f}" + (f"  [{ex}]" if ex else "")
            )
    if pairs is not None and pairs.pairs:
        lines.append(
            "pair interactions (joint - (effect_i + effect_j); <0 for two helpful = redundant):"
        )
        for i, j, joint, add, inter in pairs.pairs[:top]:
            lines.append(
                f"  {i} + {j}: joint {joint:+.5f} additive {add:+.5f} interaction {inter:+.5f}"
            )
    return "\n".join(lines)
