"""``cai report RUN_DIR``: one self-contained HTML page about a run.

It reads only the files the stages wrote (``manifest.json``, each stage's summary and metrics,
``evaluate/*.json``, the JSONL rows) and writes ``RUN_DIR/report.html``: the config, each
stage's metrics and wall time, the effect table, the Elo tables with the judge's validity, the
plots (embedded as data URIs, so the page needs no network and no other file), per-principle
statistics (the constitution as an audit trail), side-by-side answers of the snapshots to the
same held-out prompts, sample critique/revision rounds and labelled comparisons.

The page is rendered from ``templates/report.html.j2`` by Jinja2 with autoescape on (the template lives
outside ``data/``, so a change of layout reruns no stage): this module builds plain data (text, tables,
tags), and every value, model and user text above all, is escaped by the template engine; nothing is
marked safe. The page has no script and loads nothing. Missing stages
are simply left out, so the report works on a partial run.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import jinja2

from constitutional.errors import CaiError
from constitutional.evaluation.effect import fmt_diff, fmt_rate

SIDE_BY_SIDE = 6  # held-out prompts of each kind shown with every snapshot's answer
EXAMPLES = 4  # critique/revision rows and labelled comparisons shown


def _linked(path: Path) -> bool:
    """Whether ``RUN/STAGE/FILE`` (or ``RUN/FILE``) is reached through a symlink below the run directory."""
    return path.is_symlink() or (path.parent.is_symlink() and path.parent.name != "")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not _linked(path) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    if not path.is_file() or _linked(path):  # a run directory someone sent: never read outside it
        return rows
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a stage that was killed
            if isinstance(row, dict):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _image(run: Path, name: str, alt: str) -> dict | None:
    """A PNG of the run embedded as data; a symlink, or anything that is not a PNG inside the run, is left out
    (a run directory someone sent is data: the report never reads files outside it)."""
    path = run / name  # name: STAGE/FILE.png
    if _linked(path) or not path.is_file() or not path.resolve().is_relative_to(run.resolve()):
        return None
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return {"type": "figure", "alt": alt, "data": base64.b64encode(data).decode("ascii")}


def _table(header: list[str], rows: list[list]) -> dict:
    """A table block; each cell is text, or a mapping the template lays out (``tags``, ``note``, ``text``,
    ``ci``, ``block``): every value in it is escaped when the page is rendered."""
    return {"type": "table", "header": header, "rows": rows}


def _p(*parts, cls: str | None = None) -> dict:
    """A paragraph of text parts; a part ``{"b": text}`` is bold, ``{"code": text}`` code."""
    return {"type": "p", "parts": [p if isinstance(p, dict) else str(p) for p in parts], "cls": cls}


def _h3(text) -> dict:
    return {"type": "h3", "text": str(text)}


def _interval(cell) -> dict | str:
    if not cell:
        return "-"
    value, low, high = cell
    if value != value:  # NaN
        return "-"
    return {"text": f"{value:.2f}", "ci": f"[{low:.2f}, {high:.2f}]"}


def _text(value) -> str:
    return "" if value is None else str(value)


def _block(value) -> dict:
    return {"block": _text(value)}


# ------------------------------------------------------------------ sections


def _section_stages(run: Path, manifest: dict | None) -> list[dict]:
    stages = (manifest or {}).get("stages", {})
    highlights = {
        "critique_revise": ("rows", "degenerate_rows", "tokens_per_second"),
        "sft": ("train_examples", "heldout_revision_nll_before", "heldout_revision_nll_after"),
        "label": ("rows", "method", "mean_p_chosen"),
        "pm": ("heldout_accuracy", "heldout_calibration_error", "eval_pairs_accuracy"),
        "rl": ("algo", "steps", "heldout_reward_before", "heldout_reward_after", "final_kl"),
        "evaluate": ("prompts",),
    }
    rows = []
    for stage, entry in stages.items():
        summary = entry.get("summary") or {}
        shown = {k: summary[k] for k in highlights.get(stage, ()) if k in summary}
        seconds = entry.get("seconds")
        rows.append([_text(stage), _text(entry.get("status", "?")), "-" if seconds is None else f"{seconds:.0f} s",
                     ", ".join(f"{k}: {json.dumps(v)}" for k, v in shown.items())])
    if not rows:
        return [_p("No manifest.json: the stages were run one by one; see each stage's directory.")]
    return [_table(["stage", "status", "wall time", "metrics"], rows)]


def _verdict_tags(verdict: dict) -> dict:
    """The verdict's fields as small tags: a yes shows the field's name, a no shows 'not <field>'."""
    tags = []
    for name in ("harmful", "declines", "explains", "coherent", "helpful"):
        value = verdict.get(name)
        if value is None:
            continue
        good = value != (name == "harmful")
        tags.append({"text": name if value else f"not {name}", "cls": "good" if good else "bad"})
    reasons = verdict.get("reasons") or []
    return {"tags": tags, "note": ", ".join(map(str, reasons)) if reasons else None}


def _section_effect(effect: dict) -> list[dict]:
    rows = []
    for r in effect.get("rows", []):
        red, helpful = r.get("red_team", {}), r.get("helpful", {})
        rows.append([
            _text(r.get("snapshot")), _text(r.get("decoding")),
            fmt_rate(red.get("harmless_coherent")), fmt_diff(red.get("harmless_coherent_vs_base")),
            fmt_rate(red.get("declines_explains")), fmt_diff(red.get("declines_explains_vs_base")),
            fmt_rate(red.get("harmful")), fmt_rate(red.get("degenerate")),
            fmt_rate(helpful.get("helpful_coherent")), fmt_diff(helpful.get("helpful_coherent_vs_base")),
            fmt_rate(helpful.get("degenerate")),
        ])
    header = ["snapshot", "decoding", "harmless & coherent (red-team)", "vs base", "declines & explains", "vs base",
              "harmful", "degenerate (red-team)", "helpful & coherent (helpful)", "vs base", "degenerate (helpful)"]
    judge = effect.get("judge") or {}
    out = [_p("Each answer's verdict comes from the judge ", {"b": _text(judge.get("name", "rules"))},
              ", applying the rubric shipped in the package (", {"code": "constitutional/data/verdicts/rubric.yaml"},
              "); ", {"code": "cai judge-eval"}, " measures how far it agrees with people who read the answers. 95% "
              "intervals (Wilson for rates, bootstrap over prompts for differences); \"vs base\" is the paired "
              "difference in points from the base model on the same prompts.", cls="note"),
           _table(header, rows)]
    sets = effect.get("sets") or {}
    for key, meta in sets.items():
        if meta.get("kind") != "red-team" or key == "red_team":
            continue
        other = [[_text(r.get("snapshot")), _text(r.get("decoding")), fmt_rate(r.get(key, {}).get("harmless_coherent")),
                  fmt_diff(r.get(key, {}).get("harmless_coherent_vs_base")),
                  fmt_rate(r.get(key, {}).get("declines_explains")), fmt_rate(r.get(key, {}).get("harmful")),
                  fmt_rate(r.get(key, {}).get("degenerate"))] for r in effect.get("rows", [])]
        out.append(_h3(f"{_text(meta.get('name'))} ({_text(meta.get('prompts'))} prompts)"))
        out.append(_table(["snapshot", "decoding", "harmless & coherent", "vs base", "declines & explains", "harmful",
                           "degenerate"], other))
    secondary = []
    for r in effect.get("rows", []):
        red, helpful = r.get("red_team", {}), r.get("helpful", {})
        secondary.append([_text(r.get("snapshot")), _text(r.get("decoding")), fmt_rate(red.get("refusal")),
                          fmt_diff(red.get("refusal_vs_base")), fmt_rate(helpful.get("refusal")),
                          fmt_rate(helpful.get("declines")), fmt_rate(red.get("second")),
                          fmt_rate(helpful.get("second")), _interval(red.get("pm")), _interval(red.get("contrast")),
                          _text(red.get("tokens"))])
    out.append(_h3("Secondary: refusal read from the opening, second opinion, scores"))
    out.append(_table(["snapshot", "decoding", "refusal by opening (red-team)", "vs base",
                       "over-refusal by opening (helpful)", "declines (helpful, by content)", "2nd opinion red-team",
                       "2nd opinion helpful", "PM (red-team)", "contrast (red-team)", "tokens"], secondary))
    prompts = effect.get("prompts", {})
    out.append(_p("Prompts: " + ", ".join(f"{v} {k}" for k, v in prompts.items()) + ".", cls="note"))
    second = effect.get("second_opinion")
    if second:
        out.append(_p(f"Second opinion: the feedback model's contrast of a \"declines\" and a \"does the task\" "
                      f"system prompt, threshold {_text(second.get('threshold'))}, accuracy on the detector's "
                      f"{_text(second.get('examples'))} labelled examples {_text(second.get('accuracy_cross_fitted'))} "
                      f"(cross-fitted).", cls="note"))
    for w in effect.get("warnings", []):
        out.append(_p(f"Warning: {w}", cls="warn"))
    examples = effect.get("examples", [])
    if examples:
        out.append(_h3("What the answers say: verbatim examples of each verdict (greedy)"))
        out.append(_table(["snapshot", "verdict", "prompt", "answer", "fields"],
                          [[_text(e.get("snapshot")), _text(e.get("case")), _block(e.get("prompt")),
                            _block(e.get("response")), _verdict_tags(e.get("verdict") or {})] for e in examples]))
    cases = effect.get("disagreements", [])
    if cases:
        out.append(_h3("Where the detector and the second opinion disagree"))
        out.append(_table(["snapshot", "prompt", "response", "detector", "second opinion"],
                          [[_text(c.get("snapshot")), _text(c.get("prompt")), _text(c.get("response")),
                            f"{c.get('detector')} ({c.get('detector_rule')})",
                            f"{c.get('second_opinion')} ({c.get('refusal_score')})"] for c in cases]))
    return out


def _section_elo(elo: dict) -> list[dict]:
    judge = elo.get("judge", {})
    out = [_p("Judge: ", {"code": _text(judge.get("model"))}, ", method ", {"code": _text(elo.get("method"))},
              f"; Bradley-Terry fit with {_text(elo.get('anchor'))} at 0 and 95% bootstrap intervals over prompts.")]
    for w in judge.get("warnings", []):
        out.append(_p(f"Warning: {w}", cls="warn"))
    for axis, table in elo.get("axes", {}).items():
        validity = judge.get("sets", {}).get(axis, {})
        acc = validity.get("accuracy")
        out.append(_h3(axis))
        out.append(_p(f"{_text(table.get('comparisons'))} comparisons on {_text(table.get('prompts'))} prompts. "
                      f"Judge validity: accuracy {'-' if acc is None else f'{acc:.2f}'} on the shipped "
                      f"{_text(validity.get('pairs'))} pairs.", cls="note"))
        out.append(_table(["snapshot", "Elo", "95% interval"],
                          [[_text(n), f"{v['elo']:.0f}", f"[{v['low']:.0f}, {v['high']:.0f}]"]
                           for n, v in table.get("snapshots", {}).items()]))
    return out


def principle_stats(run: Path) -> tuple[list[list], list[list]]:
    """(SL rows, feedback rows): how often each principle was drawn and what came of it.

    SL: rounds drawn, revisions flagged degenerate, rows it shaped. Feedback: comparisons it
    judged and the mean confidence (p_chosen) of their labels.
    """
    drawn: Counter = Counter()
    degenerate: Counter = Counter()
    for row in _read_jsonl(run / "critique_revise" / "revisions.jsonl"):
        for rd in row.get("rounds", []):
            drawn[rd.get("principle_id")] += 1
            if rd.get("degenerate"):
                degenerate[rd.get("principle_id")] += 1
    sl = [[pid, n, degenerate[pid], f"{degenerate[pid] / n:.0%}"] for pid, n in drawn.most_common()]
    confidence: defaultdict = defaultdict(list)
    for row in _read_jsonl(run / "label" / "comparisons.jsonl"):
        for pid in row.get("principle_ids", []):
            if isinstance(row.get("p_chosen"), int | float):
                confidence[pid].append(row["p_chosen"])
    fb = [[pid, len(v), f"{sum(v) / len(v):.3f}"] for pid, v in sorted(confidence.items(), key=lambda kv: -len(kv[1]))]
    return sl, fb


def _section_principles(run: Path) -> list[dict]:
    sl, fb = principle_stats(run)
    out = []
    if sl:
        out.append(_h3("Critique/revision principles (stage 1)"))
        out.append(_table(["principle", "rounds drawn", "revisions flagged degenerate", "share"],
                          [[_text(c) for c in row] for row in sl]))
    if fb:
        out.append(_h3("Feedback principles (stage 3)"))
        out.append(_table(["principle", "comparisons judged", "mean p_chosen"],
                          [[_text(c) for c in row] for row in fb]))
    return out or [_p("No stage 1 or stage 3 rows in this run.")]


def _section_side_by_side(run: Path, effect: dict | None) -> list[dict]:
    verdicts = {v.get("id"): v for v in _read_jsonl(run / "evaluate" / "verdicts.jsonl")}
    rows = [r for r in _read_jsonl(run / "evaluate" / "responses.jsonl") if r.get("decoding") == "greedy"
            and r.get("set", r.get("kind")) in ("red-team", "helpful")]
    if not rows:
        return [_p("No evaluation responses yet (run ", {"code": "cai evaluate"}, ").")]
    order = [r["snapshot"] for r in (effect or {}).get("rows", []) if r.get("decoding") == "greedy"]
    snapshots = list(dict.fromkeys(order or [r["snapshot"] for r in rows]))
    main = [s for s in snapshots if s in ("base", "sl-cai", "rl-cai")] or snapshots[:3]
    by_prompt: dict = defaultdict(dict)
    kinds: dict = {}
    for r in rows:
        by_prompt[r["prompt_id"]][r["snapshot"]] = r
        kinds[r["prompt_id"]] = (r["kind"], r["prompt"])
    out = []
    for kind in ("red-team", "helpful"):
        ids = [pid for pid, (k, _) in kinds.items() if k == kind][:SIDE_BY_SIDE]
        if not ids:
            continue
        table_rows = []
        for pid in ids:
            cells: list = [_block(kinds[pid][1])]
            for snap in main:
                r = by_prompt[pid].get(snap)
                cells.append("-" if r is None else {**_verdict_tags(verdicts.get(r.get("id")) or {}),
                                                    **_block(r.get("response"))})
            table_rows.append(cells)
        out.append(_h3(f"{kind} prompts (held out)"))
        out.append(_table(["prompt", *main], table_rows))
    return out


def _section_revisions(run: Path) -> list[dict]:
    rows = _read_jsonl(run / "critique_revise" / "revisions.jsonl", EXAMPLES)
    if not rows:
        return [_p("No critique/revision rows.")]
    out = []
    for row in rows:
        parts = [{"type": "h4", "text": _text(row.get("id"))}, {"type": "label", "text": "Prompt"},
                 {"type": "text", "text": _text(row.get("prompt"))}, {"type": "label", "text": "Initial response"},
                 {"type": "text", "text": _text(row.get("initial_response"))}]
        for k, rd in enumerate(row.get("rounds", []), 1):
            flag = [{"text": f"degenerate: {rd['degenerate']}", "cls": "redirect"}] if rd.get("degenerate") else []
            parts += [{"type": "label", "text": f"Round {k}: {_text(rd.get('principle_id'))}", "tags": flag},
                      _p(_text(rd.get("critique_request")), cls="note"),
                      {"type": "text", "text": _text(rd.get("critique"))},
                      _p(_text(rd.get("revision_request")), cls="note"),
                      {"type": "text", "text": _text(rd.get("revision"))}]
        out.append({"type": "card", "blocks": parts})
    return out


def _section_comparisons(run: Path) -> list[dict]:
    rows = _read_jsonl(run / "label" / "comparisons.jsonl", EXAMPLES)
    if not rows:
        return [_p("No labelled comparisons.")]

    def text(messages) -> str:
        if isinstance(messages, list):
            return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return str(messages)

    table_rows = [[_block(text(r.get("prompt"))), _block(text(r.get("chosen"))), _block(text(r.get("rejected"))),
                   f"{r.get('p_chosen', float('nan')):.3f}", ", ".join(map(str, r.get("principle_ids", []))),
                   _text(r.get("method"))] for r in rows]
    return [_table(["prompt", "chosen", "rejected", "p_chosen", "principles", "method"], table_rows)]


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.text { white-space: pre-wrap; max-width: 40rem; }
.ci { color: #666; font-size: 0.8rem; }
.note { color: #555; font-size: 0.9rem; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5rem; }
.tag { display: inline-block; font-size: 0.75rem; padding: 0 0.3rem; border-radius: 3px; margin-bottom: 0.2rem; }
.tag.good { background: #d4edda; } .tag.bad { background: #f8d7da; } .tag.redirect { background: #fde2c8; }
.card { border: 1px solid #ddd; padding: 0.5rem 1rem; margin: 0.5rem 0; }
figure { display: inline-block; margin: 0.5rem; } img { max-width: 560px; }
pre { background: #f7f7f7; padding: 0.5rem; overflow-x: auto; }
"""


# The page runs no script and loads nothing: styles inline, images as data: URLs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _environment():
    """Jinja2 with autoescape on for every template: a value is text unless this module says otherwise, and it
    never does (nothing is marked safe)."""

    return jinja2.Environment(loader=jinja2.PackageLoader("constitutional", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=False)


def build_report(run_dir: str | Path) -> str:
    """The report's HTML for a run directory."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CaiError(f"report: run directory {run} does not exist")
    manifest = _read_json(run / "manifest.json")
    effect = _read_json(run / "evaluate" / "effect.json")
    elo = _read_json(run / "evaluate" / "elo.json")
    for name, value in (("manifest.json", manifest), ("evaluate/effect.json", effect), ("evaluate/elo.json", elo)):
        if value is not None and not isinstance(value, dict):
            raise CaiError(f"report: {run / name}: expected a JSON object, got a {type(value).__name__}")
    if manifest is None and not any((run / d).is_dir() for d in ("critique_revise", "sft", "label", "pm", "rl",
                                                                  "evaluate")):
        raise CaiError(f"report: {run} holds no stage output (is it a run directory?)")
    parts = [("Stages", "manifest.json", lambda: _section_stages(run, manifest))]
    if effect:
        parts.append(("Effect table", "evaluate/effect.json", lambda: _section_effect(effect)))
    if elo:
        parts.append(("Elo", "evaluate/elo.json", lambda: _section_elo(elo)))
    plots = [figure for figure in (
        _image(run, "evaluate/elo.png", "Helpfulness vs. harmlessness Elo per snapshot"),
        _image(run, "evaluate/rl_steps.png", "Elo and refusal rates against RL step"),
        _image(run, "pm/calibration.png", "Preference model calibration (held-out pairs)"),
        _image(run, "rl/reward.png", "RL reward and KL per step"),
    ) if figure]
    if plots:
        parts.append(("Plots", "", lambda: plots))
    parts += [
        ("Principles", "critique_revise/ and label/ rows", lambda: _section_principles(run)),
        ("Side by side: answers to held-out prompts (greedy)", "evaluate/", lambda: _section_side_by_side(run, effect)),
        ("Critique and revision rounds (stage 1)", "critique_revise/revisions.jsonl", lambda: _section_revisions(run)),
        ("Labelled comparisons (stage 3)", "label/comparisons.jsonl", lambda: _section_comparisons(run)),
    ]
    if manifest:
        parts.append(("Config and versions", "manifest.json",
                      lambda: [{"type": "pre", "text": json.dumps(manifest.get("config"), indent=2)},
                               {"type": "pre", "text": json.dumps(manifest.get("versions"), indent=2)}]))
    sections = []
    for title, source, render in parts:
        try:
            sections.append({"title": title, "blocks": render()})
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # a file of the wrong shape
            raise CaiError(f"report: {run / source}: a value of the wrong shape ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no detail'}); the {title!r} section cannot "
                           f"be shown") from None
    title = f"constitutional run report: {run.resolve().name}"
    return _environment().get_template("report.html.j2").render(title=title, csp=CSP, css=CSS,
                                                                sections=sections) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` (atomically) and return its path."""

    html_text = build_report(run_dir)
    path = Path(run_dir) / "report.html"
    # A new temp file (O_EXCL: never an existing file or a symlink planted in the run), then an atomic rename,
    # which replaces a symlinked report.html instead of writing through it.
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".report-", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html_text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
