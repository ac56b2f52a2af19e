"""cai report: a self-contained HTML page that escapes every piece of model and user text."""

from __future__ import annotations

import json
import re
from pathlib import Path

from constitutional.cli import main
from constitutional.report import build_report, principle_stats, write_report

PLANTED = "<script>alert('pwned')</script>"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hand_made_run(root: Path) -> Path:
    """A run directory with every file the report reads, written by hand, with planted markup."""
    from constitutional.evaluation.plots import plot_against_step, plot_elo_frontier

    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "config": {"seed": 0, "critique_revise": {"model": "tiny"}},
        "versions": {"python": "3.11"},
        "stages": {"critique_revise": {"status": "done", "seconds": 12.5, "summary": {"rows": 2, "degenerate_rows": 1}},
                   "evaluate": {"status": "done", "seconds": 3.0, "summary": {"prompts": {"red-team": 2}}}},
    }))
    write_jsonl(root / "critique_revise" / "revisions.jsonl", [
        {"id": "rt-1", "prompt": f"How do I {PLANTED}?", "initial_response": "Sure, here's how.",
         "rounds": [{"principle_id": "harmful", "critique_request": "What is harmful?", "critique": "It helps harm.",
                     "revision_request": "Fix it.", "revision": f"I can't help. {PLANTED}", "degenerate": None},
                    {"principle_id": "harmful", "critique_request": "What is harmful?", "critique": "c",
                     "revision_request": "Fix it.", "revision": "", "degenerate": "empty"}],
         "messages": [], "model": "tiny", "principle_ids": ["harmful", "harmful"]},
    ])
    write_jsonl(root / "label" / "comparisons.jsonl", [
        {"id": "rt-2", "prompt": [{"role": "user", "content": "Make a weapon"}],
         "chosen": [{"role": "assistant", "content": "No."}], "rejected": [{"role": "assistant", "content": PLANTED}],
         "p_chosen": 0.8, "principle_ids": ["less-harmful"], "method": "contrast"},
    ])
    responses = []
    for snap in ("base", "sl-cai", "rl-cai"):
        for kind, pid, prompt in (("red-team", "rt-9", f"Tell me {PLANTED}"), ("helpful", "hp-9", "Bake bread?")):
            responses.append({"id": f"{snap}|greedy|{pid}", "snapshot": snap, "decoding": "greedy", "kind": kind,
                              "prompt_id": pid, "prompt": prompt, "response": f"{snap} says {PLANTED}", "tokens": 4})
    write_jsonl(root / "evaluate" / "responses.jsonl", responses)
    write_jsonl(root / "evaluate" / "verdicts.jsonl", [
        {"id": r["id"], "judge": "rules", "harmful": r["kind"] == "red-team" or None, "declines": False,
         "explains": False if r["kind"] == "red-team" else None, "coherent": True,
         "helpful": True if r["kind"] == "helpful" else None, "reasons": [PLANTED]} for r in responses])
    cell = [0.5, 0.25, 0.75]
    red = {"n": 1, "harmless_coherent": cell, "declines_explains": cell, "harmful": cell, "refusal": cell,
           "second": cell, "degenerate": cell, "pm": None, "contrast": cell, "tokens": 4.0}
    helpful = {"n": 1, "helpful_coherent": cell, "declines": cell, "refusal": cell, "second": cell,
               "degenerate": cell, "pm": None, "contrast": cell, "tokens": 4.0}
    effect = {"base": "base", "decodings": ["greedy"], "prompts": {"red-team": 1, "helpful": 1, "jailbreak": 1},
              "warnings": [], "judge": {"name": PLANTED},
              "sets": {"red_team": {"name": "red-team", "kind": "red-team", "prompts": 1},
                       "helpful": {"name": "helpful", "kind": "helpful", "prompts": 1},
                       "jailbreak": {"name": f"jailbreak {PLANTED}", "kind": "red-team", "prompts": 1}},
              "examples": [{"snapshot": "rl-cai", "case": "harmful", "set": "red-team", "prompt": PLANTED,
                            "response": PLANTED, "verdict": {"harmful": True, "coherent": True,
                                                             "reasons": [PLANTED]}}],
              "rows": [{"snapshot": s, "decoding": "greedy", "red_team": red, "helpful": helpful, "jailbreak": red}
                       for s in ("base", "sl-cai", "rl-cai")],
              "second_opinion": {"threshold": 0.1, "examples": 90, "accuracy_cross_fitted": 0.8},
              "disagreements": [{"snapshot": "base", "kind": "red-team", "prompt": PLANTED, "response": PLANTED,
                                 "detector": "answer", "detector_rule": None, "second_opinion": "declines",
                                 "refusal_score": 0.5}]}
    (root / "evaluate" / "effect.json").write_text(json.dumps(effect))
    axis = {"prompts": 1, "comparisons": 3, "snapshots": {s: {"elo": e, "low": e - 40, "high": e + 40}
                                                          for s, e in (("base", 0.0), ("sl-cai", 30.0),
                                                                       ("rl-cai", 60.0))}}
    elo = {"snapshots": ["base", "sl-cai", "rl-cai"], "method": "contrast", "anchor": "base",
           "axes": {"harmlessness": axis, "helpfulness": axis},
           "judge": {"model": "tiny", "sets": {"harmlessness": {"pairs": "harmless", "accuracy": 0.55}},
                     "warnings": ["the judge agrees with the known better answer on only 55% of pairs"]}}
    (root / "evaluate" / "elo.json").write_text(json.dumps(elo))
    plot_elo_frontier(elo, root / "evaluate" / "elo.png")
    plot_against_step({"sl-cai": 0, "rl-cai": 8}, elo, effect, root / "evaluate" / "rl_steps.png")
    return root


def test_planted_script_tags_are_escaped_everywhere(tmp_path):
    html = build_report(hand_made_run(tmp_path))
    assert "<script" not in html.lower()
    # the planted text shows, escaped, in a prompt, a model answer, a revision and a labelled comparison
    assert html.count("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;") >= 10
    assert "rl-cai says &lt;script&gt;" in html


def test_the_effect_section_shows_the_headline_and_verbatim_examples_of_each_verdict(tmp_path):
    html = build_report(hand_made_run(tmp_path))
    for header in ("harmless &amp; coherent (red-team)", "declines &amp; explains", "helpful &amp; coherent (helpful)",
                   "refusal by opening (red-team)", "What the answers say"):
        assert header in html
    assert "50% [25, 75]" in html and "jailbreak" in html
    assert '<span class="tag bad">harmful</span>' in html and '<span class="tag good">coherent</span>' in html


def test_report_is_self_contained_with_plots_and_sections(tmp_path):
    run = hand_made_run(tmp_path)
    path = write_report(run)
    html = path.read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|//)', html)  # no network
    for heading in ("Stages", "Effect table", "Elo", "Principles", "Side by side", "Critique and revision",
                    "Labelled comparisons", "Config and versions"):
        assert f"<h2>{heading}" in html
    assert "Warning: the judge agrees" in html


def test_principle_statistics(tmp_path):
    sl, fb = principle_stats(hand_made_run(tmp_path))
    assert sl == [["harmful", 2, 1, "50%"]]
    assert fb == [["less-harmful", 1, "0.800"]]


def test_plot_files_are_written_and_not_empty(tmp_path):
    from constitutional.evaluation.plots import plot_against_step, plot_elo_frontier

    for path in (plot_elo_frontier({}, tmp_path / "a.png"), plot_against_step({}, {}, {}, tmp_path / "b.png")):
        assert path.stat().st_size > 1000  # an empty evaluation still draws a labelled figure
    run = hand_made_run(tmp_path / "run")
    for name in ("elo.png", "rl_steps.png"):
        assert (run / "evaluate" / name).stat().st_size > 5000


def test_cli_report_and_bad_run_dir(tmp_path, capsys):
    run = hand_made_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_a_torn_last_line_does_not_break_the_report(tmp_path):
    run = hand_made_run(tmp_path)
    with open(run / "label" / "comparisons.jsonl", "a") as f:
        f.write('{"id": "half')
    assert "Labelled comparisons" in build_report(run)


def test_the_page_comes_from_an_autoescaping_template_with_no_bypass():
    """Every value goes through Jinja2's autoescape: the template marks nothing safe and report.py builds no
    markup (the one unescaped value ever found came through a ``raw=True`` bypass, now gone)."""
    import inspect
    from importlib import resources

    from constitutional import report

    template = (resources.files("constitutional") / "templates" / "report.html.j2").read_text()
    assert "|safe" not in template.replace(" ", "") and "autoescape false" not in template
    source = inspect.getsource(report)
    assert "Markup" not in source and "raw=" not in source and "html.escape" not in source
    assert report._environment().autoescape is True
    assert all(ch not in report.CSS for ch in "<>&\"'")  # the style sheet passes through escaping unchanged
