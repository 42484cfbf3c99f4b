"""One self-contained HTML page of plots for a run file (plotly, its JavaScript inlined: works offline).

It shows what a run file holds: an optimizer's candidates with their validation intervals in
the order they were tried (and the rung of the race each reached), zero-shot against the
winner on held-out data and the items that flipped, per-label accuracy and confusions, the
tokens prefilled against what a cache-off engine would prefill, and, for retrieval, each
question's score beside the rank of the first retrieved document holding its answer.
"""

from __future__ import annotations

import html
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from ..metrics import format_ci
from .schema import CandidateRow, EvalSection, ItemResult, RunFile, SearchSection

INSTALL_HINT = "pip install 'promptkit[report]' (in a checkout: pip install -e '.[report]')"
COLORS = {"winner": "#d62728", "baseline": "#7f7f7f", "full": "#1f77b4", "dropped": "#9ecae1",
          "zero-shot": "#9a9a9a", "optimized": "#1f77b4", "eval": "#1f77b4", "prefilled": "#ff7f0e",
          "cached": "#2ca02c", "requested": "#c7c7c7"}
MAX_LABELS = 40  # more distinct gold values than this is not a label set
ROWS_SHOWN = 40


def require_plotly() -> Any:
    try:
        import plotly
    except ImportError as e:
        raise ImportError(f"the report draws its plots with plotly: {INSTALL_HINT}") from e
    return plotly


def write_report(run: RunFile | str | Path, output: str | Path, title: str | None = None) -> Path:
    """Write the run's report page to ``output`` (one HTML file, no server needed); returns its path."""
    if not isinstance(run, RunFile):
        run = RunFile.load(run)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run, title), encoding="utf-8")
    return path


def render_report(run: RunFile, title: str | None = None) -> str:
    """The report page as one HTML string."""
    require_plotly()
    from plotly.offline import get_plotlyjs

    sections = [s for s in _sections(run) if s]
    figures = sum(s.count('class="plotly-graph-div"') for s in sections)
    heading = html.escape(title or run.title)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{heading}</title>"
            f"<style>{CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f'<body data-figures="{figures}">'
            f"<main><h1>{heading}</h1>{_header(run)}{''.join(sections)}"
            f"<footer>promptkit run file {html.escape(run.format)}, created {html.escape(run.created)}</footer>"
            "</main></body></html>")


def _sections(run: RunFile) -> list[str]:
    if run.search is not None:
        parts = [_candidates_section(run.search)]
        if run.heldout is not None:
            parts += [_heldout_section(run), _labels_section([run.heldout.zero_shot, run.heldout.optimized]),
                      _flips_section(run)]
        else:
            parts.append(_note("No held-out result yet: evaluate the zero-shot and the optimized pipeline on "
                               "held-out data and call <code>tracker.log_heldout(zero_shot, optimized)</code>."))
        return parts + [_tokens_section(run), _candidates_table(run.search)]
    assert run.eval is not None
    return [_labels_section([run.eval]), _retrieval_section(run.eval), _tokens_section(run),
            _items_section(run.eval)]


# -- header -----------------------------------------------------------------------------------
def _header(run: RunFile) -> str:
    cards = _search_cards(run) if run.search is not None else _eval_cards(run.eval)  # type: ignore[arg-type]
    stages = [s.get("stage", "?") for s in run.pipeline.get("stages", [])]
    facts = [("pipeline", " → ".join(stages))] if stages else []
    for m in run.models:
        facts.append(("model", f"{m.model} ({m.backend}, weights {m.weights or '?'}, {m.device or '?'})"))
    if run.mlflow is not None:
        facts.append(("MLflow", _mlflow_link(run)))
    facts_html = "".join(f"<div><b>{html.escape(k)}</b> {v if k == 'MLflow' else html.escape(v)}</div>"
                         for k, v in facts)
    return f"<section class='cards'>{''.join(cards)}</section><section class='facts'>{facts_html}</section>"


def _card(label: str, value: str, note: str = "") -> str:
    return (f"<div class='card'><div class='label'>{html.escape(label)}</div><div class='value'>{html.escape(value)}"
            f"</div><div class='note'>{html.escape(note)}</div></div>")


def _search_cards(run: RunFile) -> list[str]:
    s = run.search
    assert s is not None
    cards = [_card(f"validation {s.metric}", f"{_fmt(s.baseline_score)} → {_fmt(s.best_score)}",
                   f"zero-shot → winner ({s.best_name}) on {s.val_size} examples"),
             _card("candidates", str(len(s.candidates)), f"{s.optimizer}, seed {s.seed}")]
    if run.heldout is not None:
        h = run.heldout
        cards.append(_card(f"held-out {s.metric}", f"{h.difference:+.3f}",
                           f"difference, 95 % CI [{h.difference_ci[0]:+.3f}, {h.difference_ci[1]:+.3f}] "
                           f"on {h.optimized.n} examples"))
    ratio = s.tokens.prefilled / s.tokens.requested if s.tokens.requested else None
    cards.append(_card("tokens prefilled", f"{s.tokens.prefilled:,}",
                       f"{ratio:.0%} of {s.tokens.requested:,} requested" if ratio is not None else ""))
    cards.append(_card("LM calls", f"{s.lm_calls:,}", f"{s.seconds:.1f} s"))
    return cards


def _eval_cards(e: EvalSection) -> list[str]:
    cards = [_card(e.metric, format_ci(e.score, e.ci), f"95 % bootstrap interval over {e.n} examples"),
             _card("seconds", f"{e.seconds:.1f}", e.dataset or "")]
    if e.tokens is not None and e.tokens.requested:
        cards.append(_card("tokens prefilled", f"{e.tokens.prefilled:,}",
                           f"{e.tokens.prefilled / e.tokens.requested:.0%} of {e.tokens.requested:,} requested, "
                           f"{e.tokens.cached:,} cached"))
    return cards


def _mlflow_link(run: RunFile) -> str:
    ref = run.mlflow
    assert ref is not None
    text = html.escape(f"run {ref.run_id} in {ref.tracking_uri}")
    if ref.tracking_uri.startswith(("http://", "https://")):
        url = f"{ref.tracking_uri.rstrip('/')}/#/experiments/{ref.experiment_id}/runs/{ref.run_id}"
        return f"<a href='{html.escape(url)}'>{text}</a>"
    return text


# -- sections ---------------------------------------------------------------------------------
def _section(title: str, how: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2><p class='how'>{how}</p>{body}</section>"


def _note(text: str) -> str:
    return f"<section><p class='note'>{text}</p></section>"


def _figure_html(fig: Any) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 10, "r": 10, "t": 40, "b": 10}, font={"size": 12})
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True})


def _candidates_section(s: SearchSection) -> str:
    how = (f"Each row is one candidate, in the order the search tried it (the baseline, the pipeline as given, "
           f"first). The dot is its mean validation {html.escape(s.metric)}, the bar its 95 % bootstrap interval. "
           "Candidates dropped early by the race were scored on fewer examples, so their bars are wider; the "
           "winner (red) is the best scored on the whole validation set. The dashed line is the baseline.")
    return _section("Candidates on validation, in race order", how, _figure_html(candidates_figure(s)))


def _heldout_section(run: RunFile) -> str:
    h = run.heldout
    assert h is not None
    how = (f"The zero-shot pipeline and the winner on the same {h.optimized.n} held-out examples, which the search "
           f"never saw, with 95 % bootstrap intervals. The difference's interval is paired (same examples): a gain is "
           f"real when it lies above zero. Right: how many items each got right, and which flipped.")
    return _section("Zero-shot against the winner on held-out data", how, _figure_html(heldout_figure(run)))


def _labels_section(sections: list[EvalSection]) -> str:
    if not is_classification(sections[-1].items):
        return ""
    how = ("Left: accuracy on each gold label (its number of examples under the name). Right: the confusion "
           "matrix of " + ("the winner" if len(sections) > 1 else "the pipeline") + ": rows are gold labels, "
           "columns predictions, colour the share of the row, numbers the counts; the diagonal is right.")
    return _section("Per-label accuracy and confusions", how, _figure_html(labels_figure(sections)))


def _retrieval_section(e: EvalSection) -> str:
    if not any(it.documents for it in e.items):
        return ""
    how = (f"Each dot is a question: its {html.escape(e.metric)} against the rank of the first retrieved document "
           "that contains a gold answer ('missed': none does). The bars are the mean per rank. Low scores at rank 1 "
           "are the generator's failures; low scores under 'missed' are the retriever's.")
    return _section("Per-question score beside retrieval rank", how, _figure_html(retrieval_figure(e)))


def _tokens_section(run: RunFile) -> str:
    fig = tokens_figure(run)
    if fig is None:
        return ""
    how = ("Requested: the prompt tokens of every call, which an engine without a prefix cache prefills. "
           "Prefilled: those the engine computed; cached: those it served from the prefix cache. "
           + ("Right: per candidate, in race order, with its seconds on hover." if run.search else ""))
    return _section("Where the tokens went", how, _figure_html(fig))


def _flips_section(run: RunFile) -> str:
    h = run.heldout
    assert h is not None
    rows = [(z, o) for z, o in zip(h.zero_shot.items, h.optimized.items) if z.score != o.score]
    if not rows:
        return ""
    rows.sort(key=lambda p: p[1].score - p[0].score)
    body = _table(["#", "input", "gold", "zero-shot", "winner"],
                  [[str(o.index), _inputs(o), _short(o.gold), _mark(z), _mark(o)] for z, o in rows[:ROWS_SHOWN]])
    how = (f"{sum(o.score > z.score for z, o in rows)} items the winner fixed and "
           f"{sum(o.score < z.score for z, o in rows)} it broke (shown first).")
    return _section("Items that flipped", how, body)


def _items_section(e: EvalSection) -> str:
    items = sorted(e.items, key=lambda it: (it.score, it.index))[:ROWS_SHOWN]
    retrieval = any(it.documents for it in e.items)
    header = ["#", "input", "gold", "prediction", "score"] + (["answer at rank", "retrieved (rank: id)"]
                                                               if retrieval else [])
    rows = []
    for it in items:
        row = [str(it.index), _inputs(it), _short(it.gold), _short(it.prediction), f"{it.score:.2f}"]
        if retrieval:
            row += [str(it.answer_rank or "missed"), ", ".join(f"{d.rank}: {html.escape(d.id)}" for d in it.documents)]
        rows.append(row)
    how = "The lowest-scoring items first" + (" (their MLflow traces show each stage)." if any(
        it.trace_id for it in e.items) else ".")
    return _section("Items", how, _table(header, rows))


def _candidates_table(s: SearchSection) -> str:
    rows = []
    for c in s.candidates:
        demos = ", ".join(str(d.get(_label_key(d), "?")) for d in c.demonstrations) or \
            ("per input (kNN)" if "knn" in c.settings or "strategy" in c.settings else "none")
        rows.append([str(c.order), html.escape(c.name) + (" ★" if c.winner else ""),
                     format_ci(c.score, c.ci), f"{c.n}" + (f" (rung {c.rung})" if c.rung else ""),
                     _short(c.instruction or ""), html.escape(demos), _short(c.scorer or ""),
                     str(c.lm_calls if c.lm_calls is not None else ""),
                     f"{c.tokens.prefilled:,}" if c.tokens else "", f"{c.seconds:.1f}"])
    body = _table(["#", "candidate", "validation (95 % CI)", "examples", "instruction", "demonstrations",
                   "scorer", "LM calls", "prefilled", "s"], rows)
    return _section("Candidates", "Every candidate's settings and costs (demonstrations by their labels).", body)


# -- figures ----------------------------------------------------------------------------------
def candidates_figure(s: SearchSection) -> Any:
    """Validation score with its interval per candidate, top to bottom in race order, coloured by how far it got."""
    import plotly.graph_objects as go

    fig = go.Figure()
    labels = [f"{c.order}. {c.name}" for c in s.candidates]
    for status, members in _by_status(s).items():
        fig.add_trace(go.Scatter(
            x=[c.score for c in members], y=[labels[c.order] for c in members], mode="markers", name=status,
            marker={"size": 14 if status == "winner" else 9, "symbol": "star" if status == "winner" else "circle",
                    "color": _status_color(status, members[0].rung, len(s.rungs or []))},
            error_x={"type": "data", "symmetric": False, "array": [c.ci[1] - c.score for c in members],
                     "arrayminus": [c.score - c.ci[0] for c in members], "thickness": 1.5},
            hovertext=[_candidate_hover(c, s.metric) for c in members], hoverinfo="text"))
    if s.baseline_score is not None:
        fig.add_vline(x=s.baseline_score, line_dash="dash", line_color=COLORS["baseline"],
                      annotation_text="baseline", annotation_position="top")
    fig.update_yaxes(categoryorder="array", categoryarray=labels[::-1], title=None)
    fig.update_xaxes(title=f"validation {s.metric} (95 % interval)", range=_score_range(s))
    fig.update_layout(height=140 + 26 * len(labels), legend={"orientation": "h", "y": -0.12 - 6 / (len(labels) + 4)})
    return fig


def _by_status(s: SearchSection) -> dict[str, list[CandidateRow]]:
    groups: dict[str, list[CandidateRow]] = {}
    for c in s.candidates:
        if c.winner:
            status = "winner"
        elif c.baseline:
            status = "baseline"
        elif c.raced_out:
            status = f"dropped at rung {c.rung} ({c.n} examples)" if c.rung else f"scored on {c.n} examples"
        else:
            status = f"whole validation set ({s.val_size})"
        groups.setdefault(status, []).append(c)
    return groups


def _status_color(status: str, rung: int | None, rungs: int) -> str:
    """Red for the winner, grey for the baseline, blue for the whole set, lighter the earlier a candidate dropped."""
    if status in ("winner", "baseline"):
        return COLORS[status]
    if not status.startswith(("dropped", "scored")):
        return COLORS["full"]
    light = 0.75 - 0.45 * ((rung or 1) - 1) / max(1, rungs - 1)  # 0.75 after the first rung, darker later
    return f"hsl(207, 60%, {light:.0%})"


def _score_range(s: SearchSection) -> list[float]:
    low = min(c.ci[0] for c in s.candidates)
    high = max(c.ci[1] for c in s.candidates)
    pad = max(0.02, (high - low) * 0.05)
    return [low - pad, high + pad]


def _candidate_hover(c: CandidateRow, metric: str) -> str:
    lines = [f"<b>{html.escape(c.name)}</b>", f"{metric} {format_ci(c.score, c.ci)} on {c.n} examples"]
    if c.rung:
        lines.append(f"reached rung {c.rung}" + (" (dropped)" if c.raced_out else ""))
    if c.instruction:
        lines.append("instruction: " + html.escape(_wrap(c.instruction)))
    if c.demonstrations:
        lines.append(f"{len(c.demonstrations)} demonstrations: " + html.escape(
            ", ".join(str(d.get(_label_key(d), "?")) for d in c.demonstrations)))
    if c.scorer:
        lines.append("scorer: " + html.escape(json.dumps(c.scorer)))
    if c.settings:
        lines.append("settings: " + html.escape(_wrap(json.dumps(c.settings, default=str))))
    if c.lm_calls is not None:
        lines.append(f"{c.lm_calls} LM calls, {c.tokens.prefilled if c.tokens else '?'} tokens prefilled, "
                     f"{c.seconds:.1f} s")
    return "<br>".join(lines)


def heldout_figure(run: RunFile) -> Any:
    """Held-out score with interval of zero-shot and winner, and the counts of items kept, fixed and broken."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    h = run.heldout
    assert h is not None
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                        subplot_titles=(f"held-out {h.optimized.metric} (95 % interval)",
                                        "items, zero-shot → winner"))
    for e, color in ((h.zero_shot, COLORS["zero-shot"]), (h.optimized, COLORS["optimized"])):
        fig.add_trace(go.Bar(x=[e.name], y=[e.score], marker_color=color, showlegend=False,
                             text=[format_ci(e.score, e.ci)], textposition="outside",
                             error_y={"type": "data", "symmetric": False, "array": [e.ci[1] - e.score],
                                      "arrayminus": [e.score - e.ci[0]]}), row=1, col=1)
    flips = _flip_counts(h.zero_shot.items, h.optimized.items)
    fig.add_trace(go.Bar(x=list(flips), y=list(flips.values()), text=list(flips.values()), textposition="outside",
                         marker_color=["#2ca02c", "#98df8a", "#ff9896", "#c7c7c7"], showlegend=False), row=1, col=2)
    fig.update_yaxes(range=[0, max(1.0, h.optimized.ci[1], h.zero_shot.ci[1]) * 1.15], row=1, col=1)
    fig.update_yaxes(range=[0, max(flips.values() or [1]) * 1.2 + 1], row=1, col=2)
    fig.update_xaxes(title=f"difference {h.difference:+.3f}, paired 95 % CI [{h.difference_ci[0]:+.3f}, "
                           f"{h.difference_ci[1]:+.3f}]", row=1, col=1)
    fig.update_layout(height=380)
    return fig


def _flip_counts(zero_shot: list[ItemResult], optimized: list[ItemResult]) -> dict[str, int]:
    counts = Counter((z.score >= 1.0, o.score >= 1.0) for z, o in zip(zero_shot, optimized))
    return {"right → right": counts[(True, True)], "wrong → right (fixed)": counts[(False, True)],
            "right → wrong (broken)": counts[(True, False)], "wrong → wrong": counts[(False, False)]}


def is_classification(items: list[ItemResult]) -> bool:
    """Whether gold outputs are labels: scalar strings of a small set, or items scored per label."""
    if any(it.label_scores for it in items):
        return True
    golds = [it.gold for it in items]
    if not golds or not all(isinstance(g, str) for g in golds):
        return False
    labels = set(golds)
    in_labels = sum(str(it.prediction) in labels for it in items) / len(items)
    return len(labels) <= MAX_LABELS and len(labels) < len(golds) and in_labels >= 0.5


def labels_figure(sections: list[EvalSection]) -> Any:
    """Per-label accuracy of each evaluation (grouped bars) and the last one's confusion matrix."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    last = sections[-1]
    labels = _labels(last.items)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.14,
                        subplot_titles=("accuracy per gold label", f"confusions of {last.name}"))
    counts = Counter(str(it.gold) for it in last.items)
    ticks = [f"{lab} ({counts[lab]})" for lab in labels]
    for e in sections:
        acc = _per_label_accuracy(e.items, labels)
        fig.add_trace(go.Bar(x=ticks, y=acc, name=e.name, marker_color=COLORS.get(e.name, COLORS["eval"]),
                             hovertemplate="%{x}: %{y:.2f}<extra>" + html.escape(e.name) + "</extra>"), row=1, col=1)
    z, text = _confusion(last.items, labels)
    fig.add_trace(go.Heatmap(z=z, x=labels, y=labels, text=text, texttemplate="%{text}", colorscale="Blues",
                             zmin=0, zmax=1, showscale=False,
                             hovertemplate="gold %{y}, predicted %{x}: %{text}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(range=[0, 1.05], title="accuracy", row=1, col=1)
    fig.update_yaxes(autorange="reversed", title="gold", row=1, col=2)
    fig.update_xaxes(title="predicted", row=1, col=2)
    fig.update_layout(height=300 + 22 * len(labels), barmode="group",
                      legend={"orientation": "h", "y": -0.25, "x": 0.0})
    return fig


def _labels(items: list[ItemResult]) -> list[str]:
    golds = {str(it.gold) for it in items}
    scored = [lab for it in items if it.label_scores for lab in it.label_scores]
    return list(dict.fromkeys(scored)) if scored else sorted(golds | {str(it.prediction) for it in items})


def _per_label_accuracy(items: list[ItemResult], labels: list[str]) -> list[float | None]:
    out: list[float | None] = []
    for lab in labels:
        scores = [it.score for it in items if str(it.gold) == lab]
        out.append(sum(scores) / len(scores) if scores else None)
    return out


def _confusion(items: list[ItemResult], labels: list[str]) -> tuple[list[list[float]], list[list[str]]]:
    index = {lab: i for i, lab in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for it in items:
        g, p = index.get(str(it.gold)), index.get(str(it.prediction))
        if g is not None and p is not None:
            counts[g][p] += 1
    shares = [[c / max(1, sum(row)) for c in row] for row in counts]
    return shares, [[str(c) if c else "" for c in row] for row in counts]


def retrieval_figure(e: EvalSection) -> Any:
    """Per-question score (jittered dots) and its mean (bars) at each rank of the first answer-bearing document."""
    import plotly.graph_objects as go

    depth = max(len(it.documents) for it in e.items)
    order = [str(r) for r in range(1, depth + 1)] + ["missed"]
    rank_of = {it.index: str(it.answer_rank) if it.answer_rank else "missed" for it in e.items}
    jitter = random.Random(0)
    fig = go.Figure()
    means = [_mean([it.score for it in e.items if rank_of[it.index] == r]) for r in order]
    ticks = [f"{r} (n={sum(rank_of[it.index] == r for it in e.items)})" for r in order]
    fig.add_trace(go.Bar(x=ticks, y=means, name=f"mean {e.metric}", marker_color="#c6dbef"))
    fig.add_trace(go.Scatter(
        x=[order.index(rank_of[it.index]) + jitter.uniform(-0.25, 0.25) for it in e.items],
        y=[it.score for it in e.items], mode="markers", name="question", xaxis="x2",
        marker={"color": COLORS["eval"], "size": 7, "opacity": 0.7},
        hovertext=[f"{html.escape(_short_text(_first_input(it), 90))}<br>gold: {html.escape(_short_text(it.gold, 60))}"
                   f"<br>prediction: {html.escape(_short_text(it.prediction, 60))}<br>{e.metric} {it.score:.2f}"
                   for it in e.items], hoverinfo="text"))
    fig.update_layout(height=420, xaxis2={"overlaying": "x", "visible": False, "range": [-0.5, len(order) - 0.5]},
                      xaxis={"title": "rank of the first retrieved document holding a gold answer",
                             "range": [-0.5, len(order) - 0.5]},
                      yaxis={"title": e.metric, "range": [-0.05, 1.15]}, legend={"orientation": "h", "y": 1.1})
    return fig


def tokens_figure(run: RunFile) -> Any:
    """Prompt tokens requested, prefilled and cached in all; per candidate too for a search."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tokens = run.search.tokens if run.search is not None else (run.eval.tokens if run.eval else None)
    if tokens is None or not tokens.requested:
        return None
    cands = [c for c in run.search.candidates if c.tokens is not None] if run.search is not None else []
    fig = make_subplots(rows=1, cols=2 if cands else 1, column_widths=[0.3, 0.7] if cands else None,
                        subplot_titles=("all calls", "per candidate") if cands else ("all calls",))
    fig.add_trace(go.Bar(x=["requested (no cache)", "prefilled", "cached"],
                         y=[tokens.requested, tokens.prefilled, tokens.cached],
                         marker_color=[COLORS["requested"], COLORS["prefilled"], COLORS["cached"]],
                         text=[f"{v:,}" for v in (tokens.requested, tokens.prefilled, tokens.cached)],
                         textposition="outside", showlegend=False), row=1, col=1)
    if cands:
        names = [f"{c.order}. {c.name}" for c in cands]
        hover = [f"{c.lm_calls} LM calls, {c.seconds:.1f} s" for c in cands]
        for key in ("prefilled", "cached"):
            fig.add_trace(go.Bar(x=names, y=[getattr(c.tokens, key) for c in cands], name=key, hovertext=hover,
                                 marker_color=COLORS[key]), row=1, col=2)
        fig.update_layout(barmode="stack")
    fig.update_yaxes(title="prompt tokens", row=1, col=1)
    fig.update_layout(height=420 if cands else 320, legend={"orientation": "h", "y": 1.12})
    return fig


# -- small helpers ------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<div class='table'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _label_key(demo: dict[str, Any]) -> str:
    return "label" if "label" in demo else list(demo)[-1] if demo else "label"


def _inputs(item: ItemResult) -> str:
    return html.escape(_short_text(" | ".join(str(v) for v in item.inputs.values()), 160))


def _first_input(item: ItemResult) -> Any:
    return next(iter(item.inputs.values()), "")


def _mark(item: ItemResult) -> str:
    return f"{'✓' if item.score >= 1.0 else '✗'} {_short(item.prediction)}"


def _short(value: Any) -> str:
    return html.escape(_short_text(value, 120))


def _short_text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wrap(text: str, width: int = 80) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) > width:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    return "<br>".join(lines + [line])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:1200px;margin:0 auto;padding:20px 28px}
h1{font-size:22px;margin:6px 0 14px}h2{font-size:17px;margin:0 0 4px}
section{background:#fff;border:1px solid #e3e5e8;border-radius:8px;padding:14px 16px;margin:0 0 14px}
section.cards{display:flex;gap:12px;flex-wrap:wrap;background:none;border:none;padding:0}
.card{background:#fff;border:1px solid #e3e5e8;border-radius:8px;padding:10px 14px;min-width:170px;flex:1}
.card .label{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:24px;font-weight:600;margin:2px 0}.card .note{font-size:12px;color:#555}
.facts{font-size:13px;display:grid;grid-template-columns:1fr;gap:3px}.facts b{color:#555;margin-right:6px}
p.how{font-size:13px;color:#555;margin:0 0 8px;max-width:980px}p.note{font-size:13px;margin:0}
.table{overflow-x:auto}table{border-collapse:collapse;font-size:12px;width:100%}
th,td{border-bottom:1px solid #eee;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#fafafa;position:sticky;top:0}footer{font-size:11px;color:#888;margin:8px 0 20px}
"""
