"""Templates render from plain dict contexts, escape user data, and carry their key elements."""

import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from app import plots
from app.resources import TEMPLATE_DIR
from app.templating import (
    PAGE_ROUTES,
    ago,
    make_environment,
    make_templates,
    num,
    pct,
    query_string,
    short_hash,
    sign_class,
    signed,
    url,
)

EVIL = "<script>alert(1)</script>"
NOW = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Collects elements (tag, attrs) and checks that every opened element is closed."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.text: list[str] = []
        self.in_svg = 0
        self.feed(html)
        self.close()
        assert self.stack == [], f"unclosed elements: {self.stack}"

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag=None, **attrs) -> list[dict]:
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements
                if (tag is None or t == tag) and all(a.get(k) == v for k, v in want.items())]

    def one(self, tag=None, **attrs) -> dict:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


@pytest.fixture(scope="module")
def env():
    return make_environment(strict=True)


def render(env, name: str, context: dict) -> str:
    return env.get_template(name).render(**context)


# ------------------------------------------------------------------ representative contexts
BASE = {
    "csrf_token": "tok-123\"'<>",
    "user": {"name": "ada", "role": "researcher"},
    "messages": [{"level": "success", "text": "Committed v3"}, {"level": "error", "text": EVIL}],
}
MODEL = {"name": "demo", "backbone": "demo-vit", "dataset": "shapes", "bank": "shape-words", "version": 3,
         "parent": 2, "classes": ["circle", "square", EVIL]}
CONCEPTS = [
    {"name": "round edge", "weight": 1.2, "max_abs_weight": 1.2, "source": "text", "quality": 0.91},
    {"name": EVIL, "weight": -0.4, "max_abs_weight": 0.8, "source": "cav", "quality": 0.66},
    {"name": "blue background", "weight": 0.0, "max_abs_weight": 0.0, "source": "discovered", "quality": None},
]
PREVIEW = {
    "edits": [{"op": "prune", "concept": "blue background", "class_name": None},
              {"op": "prune", "concept": EVIL, "class_name": "circle"}],
    "edits_json": json.dumps([{"op": "prune", "concept": EVIL, "class": "circle"}]),
    "base_version": 3,
    "target_split": "test_shifted",
    "splits": [{"name": "train", "before": 0.95, "after": 0.94, "n": 600},
               {"name": "test", "before": 0.90, "after": 0.90, "n": 200},
               {"name": "test_shifted", "before": 0.55, "after": 0.71, "n": 200}],
    "groups": [{"name": "blue circles", "before": 0.4, "after": 0.7}, {"name": EVIL, "before": 0.9, "after": 0.88}],
    "worst_group": {"name": "blue circles", "before": 0.4, "after": 0.7},
    "classes": [{"name": "circle", "before": 0.8, "after": 0.85}],
    "flipped": [{"id": "test/circle/001.png", "label": "circle", "before": "square", "after": "circle"},
                {"id": "test/square/&odd.png", "label": "square", "before": "square", "after": "circle"}],
    "n_flipped": 17,
    "chart": plots.delta_bars([("train", 0.95, 0.94), ("test_shifted", 0.55, 0.71)], "Preview"),
}
SUGGESTIONS = {
    "form": {"method": "tfti", "target_split": "test_shifted", "shots": 4, "seed": 0, "k": 5, "metric": "accuracy",
             "split": "", "top": 5},
    "options": {"splits": ["train", "test", "test_shifted"], "methods": [("tfti", "TF-TTI"), ("greedy", "greedy")],
                "metrics": [("accuracy", "accuracy")]},
    "error": None,
    "result": {"method": "tfti", "version": 3, "target_split": "test_shifted (without the shots)",
               "shots": {"split": "test_shifted", "n": 8, "seed": 0, "images": []},
               "proposals": [{"id": 1, "source": "tfti", "kind": "mask", "title": f"mask {EVIL}",
                              "evidence": [f"raises {EVIL}"], "edits_json": json.dumps([{"op": "prune", "concept": EVIL}]),
                              "splits": PREVIEW["splits"]}],
               "combined": {"edits_json": "[]", "splits": PREVIEW["splits"]}},
}
IMAGES = [{"id": f"test/circle/{i:03d}.png", "label": "circle", "predicted": "circle" if i % 3 else "square",
           "correct": bool(i % 3), "confidence": 0.5 + i / 100, "group": "blue" if i % 2 else None} for i in range(12)]
JOB = {"id": 7, "title": "Embedding shapes", "status": "running", "progress": 0.42, "done": 42, "total": 100,
       "message": "batch 5 of 12", "kind": "embed", "created_at": NOW}


def contexts() -> dict[str, dict]:
    model_page = {
        **BASE, "nav": "models", "model": MODEL, "selected_class": "circle",
        "weight_chart": plots.weight_bars([(c["name"], c["weight"]) for c in CONCEPTS], "circle"),
        "heatmap_chart": plots.heatmap(MODEL["classes"], [c["name"] for c in CONCEPTS], [[1, -1, 0]] * 3, "all"),
        "concepts": CONCEPTS, "table": {"q": "", "sort": "weight", "order": "desc"},
    }
    image_page = {
        **BASE, "nav": "images", "model": MODEL,
        "image": {"id": "test/circle/001.png", "label": "circle", "split": "test", "group": "blue",
                  "predicted": "square", "correct": False,
                  "probabilities": [{"name": "square", "prob": 0.7}, {"name": "circle", "prob": 0.3}],
                  "concepts": [{"name": "round edge", "score": 0.2}, {"name": EVIL, "score": 1.1}]},
        "waterfall_chart": plots.waterfall([("round edge", -0.5), (EVIL, 1.0)], 0.1, "square"),
        "overlay": {"target": "concept:round edge", "opacity": 0.5, "concepts": ["round edge", EVIL],
                    "classes": ["circle", "square"], "colorbar": plots.colorbar_svg(0, 1)},
    }
    whatif = {"concept": EVIL, "score_before": 0.2, "score_after": 2.0, "predicted_before": "square",
              "predicted_after": "circle", "probabilities": [{"name": "circle", "before": 0.3, "after": 0.8},
                                                             {"name": "square", "before": 0.7, "after": 0.2}]}
    diff = {"a": {"number": 2, "message": "initial", "author": "ada"}, "b": {"number": 3, "message": EVIL},
            "metrics": [{"name": "train", "a": 0.9, "b": 0.92}, {"name": "test_shifted", "a": 0.6, "b": 0.55}],
            "weights": [{"class_name": "circle", "concept": EVIL, "a": 0.4, "b": 0.0}], "n_changed": 5}
    versions = [{"number": n, "parent": n - 1 if n > 1 else None, "author": "ada", "message": f"edit {n} {EVIL}",
                 "op": "prune water (every class)", "created_at": NOW - timedelta(hours=n),
                 "accuracy": {"train": 0.9, "test": 0.8 + n / 100}} for n in (3, 2, 1)]
    return {
        "login.html": {"csrf_token": "t", "error": "Wrong name or password", "username": EVIL, "next": "/models/demo"},
        "error.html": {**BASE, "status_code": 404, "message": f"No model named {EVIL}", "request_id": "abc"},
        "home.html": {**BASE, "nav": "models", "models": [
            {**MODEL, "accuracy": {"train": 0.95, "test": 0.873}, "updated_at": NOW},
            {**MODEL, "name": "other", "accuracy": {"train": 0.5}}]},
        "model.html": model_page,
        "_concept_table.html": {"model": MODEL, "selected_class": "circle", "concepts": CONCEPTS,
                                "table": {"q": "edge", "sort": "name", "order": "asc"}},
        "_preview.html": {"csrf_token": "t", "model": MODEL, "preview": PREVIEW},
        "history.html": {**BASE, "model": MODEL, "versions": versions,
                         "metrics_chart": plots.metric_lines({"train": [0.9] * 3}, ["v1", "v2", "v3"], "acc"),
                         "compare": {"a": 2, "b": 3}, "diff": diff},
        "_diff.html": {"model": MODEL, "diff": diff},
        "images.html": {**BASE, "nav": "images", "model": MODEL,
                        "filters": {"split": "test", "label": "circle", "predicted": "", "correct": "no", "group": ""},
                        "options": {"splits": ["train", "test"], "classes": ["circle", "square"], "groups": ["blue"]},
                        "images": IMAGES, "page": {"number": 5, "total_pages": 9, "total_items": 100}},
        "_image_grid.html": {"model": MODEL, "filters": {"split": "test"}, "images": [{**IMAGES[0], "label": EVIL}, IMAGES[1]],
                             "page": {"number": 1, "total_pages": 1, "total_items": 2}},
        "image.html": image_page,
        "_overlay.html": {"model": MODEL, "image": {"id": "a/b.png"}, "overlay": {"target": "concept:" + EVIL, "opacity": 0.3}},
        "_whatif.html": {"whatif": whatif},
        "upload.html": {**BASE, "model": MODEL, "max_mb": 8, "error": EVIL},
        "bank.html": {**BASE, "nav": "concepts", "model": MODEL, "bank": {"name": "shape-words", "backbone": "demo"},
                      "flag_rule": "|w| >= 0.5 and existence < 0.5", "concepts": [
                          {"name": "round edge", "source": "text", "phrase": "a round edge", "quality": 0.91,
                           "quality_kind": "AUROC", "existence": 0.9, "location": 0.7, "max_abs_weight": 1.2,
                           "flagged": False},
                          {"name": EVIL, "source": "cav", "quality": 0.6, "quality_kind": "CAV accuracy",
                           "existence": 0.1, "location": None, "max_abs_weight": 0.9, "flagged": True}]},
        "job.html": {**BASE, "nav": "jobs", "job": JOB},
        "_job_progress.html": {"job": {**JOB, "status": "done", "progress": 1.0, "result_url": "/models/demo"}},
        "_suggestions.html": {"csrf_token": "t", "model": MODEL, "suggestions": SUGGESTIONS},
        "suggestions.html": {**BASE, "model": MODEL, "suggestions": {**SUGGESTIONS, "result": None, "error": EVIL}},
        "base.html": {**BASE},
        "_macros.html": {},
        "build.html": {**BASE, "nav": "build", "backbone": None, "data_root": "/data/" + EVIL,
                       "datasets": [{"name": "toy", "source": EVIL, "classes": ["cat", EVIL], "n_images": 12},
                                    {"name": "broken", "source": None, "classes": [], "n_images": None,
                                     "error": EVIL}],
                       "banks": [{"name": "concepts", "concepts": ["water"], "sources": ["text"]}],
                       "form": {"name": EVIL, "path": "../up", "phrases": EVIL}, "which": "dataset", "error": EVIL,
                       "jobs": [{"id": 3, "title": EVIL, "status": "running", "progress": 0.5}]},
    }


def study_contexts() -> dict[str, dict]:
    """User studies: the researcher's pages and the participant's workspace."""
    budget = {"total": 5, "used": 2, "left": 3}
    status = {"status": "active", "version": 3, "deadline_at": NOW, "seconds_left": 754, "budget": budget,
              "prunes": [{"class_name": "circle", "concept": EVIL}], "can_undo": True, "submitted_version": None}
    work = {**status, "study": {"name": EVIL, "task": f"fix {EVIL}"}, "pseudonym": "P1a2b3c4d",
            "tools": ["weights", "maps", "preview", "suggestions"], "splits": ["test"], "classes": ["circle", EVIL],
            "accuracy": {"test": 0.9}}
    concepts = {"class_name": "circle", "classes": ["circle", EVIL], "version": 3, "concepts": [
        {"concept": EVIL, "weight": 0.0, "base_weight": 1.2, "pruned": True},
        {"concept": "round edge", "weight": -0.4, "base_weight": -0.4, "pruned": False}]}
    preview = {"prunes": [{"concept": EVIL, "class_name": "circle"}], "prunes_json": json.dumps([{"concept": EVIL}]),
               "base_version": 3, "over_budget": True, "error": EVIL,
               "splits": [{"name": "test", "n": 200, "before": 0.9, "after": 0.92, "delta": 0.02, "n_flipped": 5,
                           "newly_correct": 4, "newly_wrong": 1}]}
    study = {"id": 4, "name": EVIL, "status": "open", "base_model": "demo", "base_version": 3, "task": EVIL,
             "consent_text": EVIL, "visible_splits": "in_distribution", "target_split": "test_shifted",
             "in_distribution_split": "test", "shown_splits": ["test"],
             "conditions": [{"name": EVIL, "tools": ["weights", "preview"]}, {"name": "b", "tools": ["weights"]}],
             "time_limit_s": 1200, "edit_budget": 5, "created_at": NOW, "opened_at": NOW, "closed_at": None,
             "invitations": {"unused": 2, "used": 3}}
    row = {"pseudonym": "P1a2b3c4d", "condition": EVIL, "status": "submitted", "joined_at": NOW, "deadline_at": None,
           "submitted_at": NOW, "version": 3, "n_prunes": 2, "n_events": 17, "last_event_at": NOW}
    submission = {"pseudonym": "P1a2b3c4d", "condition": EVIL, "submitted_version": 3, "n_prunes": 1, "accuracy": 0.7,
                  "correct": 7, "n": 10, "delta_vs_base": 0.1, "prunes": [{"class_name": "circle", "concept": EVIL}]}
    results = {"target_split": "test_shifted", "k": 5, "k_source": "edit budget",
               "base": {"accuracy": 0.6, "correct": 6, "n": 10},
               "random": {"mean": 0.55, "std": 0.05, "k": 5, "seeds": 20},
               "oracle": {"accuracy": 0.9, "correct": 9, "n": 10, "k": 5,
                          "prunes": [{"class_name": "circle", "concept": EVIL}]},
               "submissions": [submission],
               "conditions": {EVIL: {"n": 1, "mean": 0.7, "std": None, "min": 0.7, "max": 0.7}},
               "agreement": {"raters": 1, "units": 12, "jaccard_mean": None, "jaccard_pairs": 0, "fleiss_kappa": None},
               "chart": plots.strip_plot([(EVIL, [0.7])], "per condition", [("base", 0.6)])}
    return {
        "studies.html": {**BASE, "nav": "studies", "studies": [
            {"id": 4, "name": EVIL, "status": "open", "base_model": "demo", "base_version": 3, "participants": 3,
             "conditions": [EVIL], "created_at": NOW}]},
        "study_new.html": {**BASE, "nav": "studies",
                           "models": [{"id": 1, "name": EVIL, "version": 3, "splits": ["test"]}],
                           "form": {"name": EVIL, "base_model": "1", "conditions": EVIL}, "error": EVIL,
                           "tools": ["weights", "maps", "preview", "suggestions"],
                           "visible_choices": [("in_distribution", "in"), ("all", "all"), ("none", "none")]},
        "study.html": {**BASE, "nav": "studies", "study": study, "progress": [row], "results": results,
                       "results_problem": "", "invitation_links": [f"http://x/join?code={EVIL}"],
                       "exports": {"csv": "/api/v1/studies/4/export?format=csv"}},
        "study_join.html": {**BASE, "user": None, "code": EVIL, "error": EVIL,
                            "study": {"name": EVIL, "consent_text": f"{EVIL}\nsecond", "time_limit_s": 600,
                                      "edit_budget": 5}},
        "study_work.html": {**BASE, "user": {"name": "study4-P1a2b3c4d", "role": "participant"}, "nav": "studies",
                            "work": work, "concepts": concepts, "preview": preview},
        "_study_status.html": {"status": {k: v for k, v in status.items() if k != "prunes"}},
        "_study_concepts.html": {"work": work, "concepts": concepts},
        "_study_concept.html": {"concept": {
            "concept": EVIL, "source": "text", "phrase": EVIL, "maps": True,
            "weights": [{"class_name": EVIL, "weight": 0.0, "base_weight": 1.0, "pruned": True}]}},
        "_study_examples.html": {"size": 160, "examples": {"concept": EVIL, "images": [
            {"image_id": f"test/{EVIL}.png", "split": "test", "label": EVIL, "score": 1.5}]}},
        "_study_suggestions.html": {"csrf_token": "t", "work": work, "suggestions": {
            "version": 3, "split": "test", "prunes": [{"class_name": "circle", "concept": EVIL}]}},
        "_study_preview.html": {"csrf_token": "t", "work": work, "preview": preview},
    }


CONTEXTS = contexts()
CONTEXTS.update(study_contexts())


# ------------------------------------------------------------------ every template
def test_build_page_shows_the_lists_forms_and_the_refusal(env):
    page = Page(render(env, "build.html", CONTEXTS["build.html"]))
    assert page.one("tr", data_name="toy") and page.one("tr", data_name="broken")
    assert page.one("form", action="/build/dataset") and page.one("form", action="/build/model")
    assert page.one("input", name="path")["value"] == "../up"  # the refused value comes back
    assert page.one("input", name="backbone")  # no backbone yet: the first dataset names it
    assert page.one("a", href="/jobs/3")
    assert [a for t, a in page.elements if t == "button" and "disabled" in a] == []  # datasets and banks exist
    empty = Page(render(env, "build.html", {**CONTEXTS["build.html"], "banks": [], "backbone": "demo"}))
    assert len([a for t, a in empty.elements if t == "button" and "disabled" in a]) == 1  # no bank: no training
    assert empty.find("input", name="backbone") == []


def test_every_template_has_a_fixture():
    names = {p.name for p in TEMPLATE_DIR.glob("*.html")}
    assert names == set(CONTEXTS), "add a representative context for each new template"


@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_renders_balanced_html_and_escapes_user_data(env, name):
    html = render(env, name, CONTEXTS[name])
    Page(html)  # well nested
    assert EVIL not in html
    if EVIL in repr(CONTEXTS[name]):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_every_template_documents_its_context():
    for path in TEMPLATE_DIR.glob("*.html"):
        head = path.read_text()[:200]
        assert head.startswith("{#"), f"{path.name} must start with a context comment"


def test_no_template_disables_escaping():
    offenders = []
    for path in Path(TEMPLATE_DIR).rglob("*.html"):
        text = path.read_text()
        if re.search(r"\|\s*safe\b", text) or re.search(r"autoescape\s+false", text, re.I) or "Markup(" in text:
            offenders.append(path.name)
    assert offenders == []


def test_every_url_name_used_exists():
    names = set()
    for path in TEMPLATE_DIR.glob("*.html"):
        names |= set(re.findall(r"url\('([a-z_]+)'", path.read_text()))
    assert names and names <= set(PAGE_ROUTES)


# ------------------------------------------------------------------ layout
def test_base_has_csrf_nav_assets_flash_and_logout(env):
    page = Page(render(env, "images.html", CONTEXTS["images.html"]))
    token = CONTEXTS["images.html"]["csrf_token"]
    assert page.one("meta", name="csrf-token")["content"] == token
    body = page.one("body")
    assert json.loads(body["hx-headers"]) == {"X-CSRF-Token": token}
    assert page.one("script")["src"] == "/static/vendor/htmx-2.0.11.min.js"
    assert page.one("link", rel="stylesheet")["href"] == "/static/css/app.css"
    nav = [a["href"] for a in page.find("a") if a.get("href", "").startswith("/") and a.get("href") != "/"]
    assert {"/models/demo/images", "/models/demo/bank", "/jobs", "/studies"} <= set(nav)
    assert page.one("a", aria_current="page")["href"] == "/models/demo/images"
    logout = page.one("form", action="/logout")
    assert logout["method"] == "post"
    assert "Committed v3" in page.all_text and page.find(role="alert")
    assert "ada" in page.all_text


def test_login_page_has_no_nav_and_a_csrf_form(env):
    page = Page(render(env, "login.html", CONTEXTS["login.html"]))
    assert page.find("nav") == []
    assert page.one("input", name="csrf_token")["value"] == "t"
    assert page.one("input", type="password")["name"] == "password"


# ------------------------------------------------------------------ model page and preview
def test_model_page_charts_table_and_edit_controls(env):
    html = render(env, "model.html", CONTEXTS["model.html"])
    page = Page(html)
    assert html.count("<svg") == 2  # charts pass through unescaped (they are Markup)
    assert page.one("form", id="edit-form")["hx-post"] == "/models/demo/preview"
    assert page.one(id="preview")
    assert page.one("input", id="pending-edits")["form"] == "edit-form"
    prunes = page.find("button", name="prune_class") + page.find("button", name="prune_all")
    assert len(prunes) == 2 * len(CONCEPTS) and all(b["form"] == "edit-form" for b in prunes)
    assert "disabled" in page.one("button", name="prune_class", value="blue background")
    assert page.one("form", action="/models/demo/undo")
    assert page.one("a", href="/models/demo/history")
    assert page.one("input", type="search")["name"] == "q"
    assert page.one("option", value="circle", selected=None)  # the selected class


def test_concept_table_sort_links_work_with_and_without_js(env):
    page = Page(render(env, "_concept_table.html", CONTEXTS["_concept_table.html"]))
    assert page.one(id="concept-table")
    name_sort = page.one("a", href="/models/demo?class=circle&q=edge&sort=name&order=desc")
    assert name_sort["hx-get"] == "/models/demo/concepts?class=circle&q=edge&sort=name&order=desc"
    assert name_sort["hx-target"] == "#concept-table"
    assert page.one("th", aria_sort="ascending")


def test_preview_shows_every_split_with_its_delta_and_a_commit_form(env):
    page = Page(render(env, "_preview.html", CONTEXTS["_preview.html"]))
    text = page.all_text
    for split, delta in (("train", "\u22121.0 pts"), ("test", "\u00b10.0 pts"), ("test_shifted", "+16.0 pts")):
        assert split in text and delta in text
    assert page.one("tr", class_="highlight")  # the shifted split
    assert "+30.0 pts" in text  # a group
    commit = page.one("form", action="/models/demo/commit")
    assert commit["method"] == "post"
    edits = [a for t, a in page.elements if t == "input" and a.get("name") == "edits"]
    assert all(json.loads(e["value"]) == json.loads(PREVIEW["edits_json"]) for e in edits) and len(edits) == 2
    assert page.one("input", name="base_version")["value"] == "3"
    assert page.one("input", name="message")
    thumbs = page.find("a", class_="thumb right") + page.find("a", class_="thumb wrong")
    assert [t["href"] for t in thumbs] == ["/models/demo/images/view?id=test%2Fcircle%2F001.png",
                                          "/models/demo/images/view?id=test%2Fsquare%2F%26odd.png"]
    assert "17 predictions change" in text and "Prune “blue background” for every class" in text


def test_empty_preview_has_no_commit_form(env):
    context = {"csrf_token": "t", "model": MODEL, "preview": {**PREVIEW, "edits": [], "edits_json": "[]"}}
    page = Page(render(env, "_preview.html", context))
    assert page.find("form") == [] and "No pending edits" in page.all_text


# ------------------------------------------------------------------ history
def test_history_lists_versions_with_revert_and_compare(env):
    page = Page(render(env, "history.html", CONTEXTS["history.html"]))
    reverts = page.find("form", action="/models/demo/revert")
    assert len(reverts) == 2  # not for the current version
    assert {i["value"] for i in page.find("input", name="version")} == {"2", "1"}
    assert len(page.find("input", name="a")) == 3 and len(page.find("input", name="b")) == 3
    assert page.one("input", name="a", value="2")["checked"] is None
    assert page.one("form", id="compare-form")["hx-get"] == "/models/demo/diff"
    assert page.one("section", id="diff")
    assert "<svg" in render(env, "history.html", CONTEXTS["history.html"])


def test_diff_shows_metrics_and_changed_weights(env):
    page = Page(render(env, "_diff.html", CONTEXTS["_diff.html"]))
    assert "v2 → v3" in page.all_text and "\u22125.0 pts" in page.all_text and "+2.0 pts" in page.all_text
    assert "5 changed weights" in page.all_text and "Showing 1 of 5" in page.all_text


# ------------------------------------------------------------------ images
def test_image_grid_paginates_with_and_without_js(env):
    html = render(env, "images.html", CONTEXTS["images.html"])
    page = Page(html)
    assert len(page.find("a", class_="thumb right")) + len(page.find("a", class_="thumb wrong")) == 12
    paged = [a for a in page.find("a") if "page=" in a.get("href", "")]
    pages = sorted(int(re.search(r"page=(\d+)", a["href"]).group(1)) for a in paged)
    assert pages == [1, 3, 4, 4, 6, 6, 7, 9]  # first, window around 5, previous/next, last
    assert "…" in page.all_text
    link = next(a for a in paged if a["href"] == "/models/demo/images?split=test&label=circle&correct=no&page=6")
    assert link["hx-get"] == "/models/demo/images/grid?split=test&label=circle&correct=no&page=6"
    assert link["hx-push-url"] == link["href"] and link["hx-target"] == "#image-grid"
    assert page.one("span", aria_current="page")
    filters = page.one("form", action="/models/demo/images")
    assert filters["method"] == "get" and filters["hx-select"] == "#image-grid"
    assert page.one("option", value="no", selected=None)


def test_single_page_grid_has_no_page_links(env):
    page = Page(render(env, "_image_grid.html", CONTEXTS["_image_grid.html"]))
    assert page.find("nav") == [] and page.one("section", id="image-grid")


def test_image_page_overlay_waterfall_and_whatif(env):
    context = CONTEXTS["image.html"]
    html = render(env, "image.html", context)
    page = Page(html)
    overlay = page.one("img", id="overlay")
    assert overlay["src"].startswith("/models/demo/images/overlay.png?id=test%2Fcircle%2F001.png")
    controls = page.one("form", hx_target="#overlay-figure")
    assert controls["hx-get"] == "/models/demo/images/overlay"
    assert page.one("input", type="range")["name"] == "opacity"
    assert page.one("option", value="concept:round edge", selected=None)
    assert 'data-concept="round edge"' in html and "NOT round edge" in html
    assert page.one("form", hx_target="#whatif")["hx-get"] == "/models/demo/images/whatif"
    assert page.one(id="whatif")
    assert len(page.find("meter")) == 2
    with_result = render(env, "image.html", {**context, "whatif": CONTEXTS["_whatif.html"]["whatif"]})
    assert "changes from" in Page(with_result).all_text


def test_whatif_and_overlay_fragments(env):
    page = Page(render(env, "_whatif.html", CONTEXTS["_whatif.html"]))
    assert page.one(id="whatif") and "+50.0 pts" in page.all_text
    page = Page(render(env, "_overlay.html", CONTEXTS["_overlay.html"]))
    assert page.one("img", id="overlay")["src"] == (
        "/models/demo/images/overlay.png?id=a%2Fb.png&target=concept%3A%3Cscript%3Ealert%281%29%3C%2Fscript%3E&opacity=0.3")


def test_upload_form(env):
    page = Page(render(env, "upload.html", CONTEXTS["upload.html"]))
    form = page.one("form", enctype="multipart/form-data")
    assert form["method"] == "post" and form["action"] == "/models/demo/images/upload"
    assert page.one("input", type="file")["accept"] == "image/png,image/jpeg"


def test_bank_flags_high_weight_low_existence(env):
    page = Page(render(env, "bank.html", CONTEXTS["bank.html"]))
    assert len(page.find("tr", class_="flagged")) == 1
    assert "high weight, low existence" in page.all_text and "AUROC" in page.all_text


# ------------------------------------------------------------------ jobs
def test_running_job_polls_and_finished_job_stops(env):
    running = Page(render(env, "job.html", CONTEXTS["job.html"]))
    poller = running.one(id="job-progress")
    assert poller["hx-get"] == "/jobs/7/progress" and poller["hx-trigger"] == "every 1s"
    assert running.one("progress")["value"] == "0.42"
    done = Page(render(env, "_job_progress.html", CONTEXTS["_job_progress.html"]))
    assert "hx-trigger" not in done.one(id="job-progress")
    assert done.one("a", href="/models/demo")


def test_job_result_link_must_be_local(env):
    job = {**JOB, "status": "done", "result_url": "javascript:alert(1)"}
    html = render(env, "_job_progress.html", {"job": job})
    assert "javascript:" not in html


# ------------------------------------------------------------------ environment and filters
def test_make_templates_forces_autoescape_and_renders_responses():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    templates = make_templates()
    assert templates.env.autoescape is True
    assert {"pct", "signed", "ago", "short_hash"} <= set(templates.env.filters)
    app = FastAPI()

    @app.get("/oops")
    def oops(request: Request):
        return templates.TemplateResponse(request, "error.html", {"status_code": 404, "message": EVIL},
                                          status_code=404)

    response = TestClient(app).get("/oops")
    assert response.status_code == 404 and EVIL not in response.text and "Not found" in response.text


def test_lenient_environment_tolerates_missing_optional_keys():
    html = make_environment().get_template("error.html").render(message="x")
    assert "Something went wrong" in html
    with pytest.raises(KeyError, match="needs model"):  # a missing model is a bug, not "/models/"
        make_environment().get_template("upload.html").render(model={}, csrf_token="t")


def test_pct_and_signed():
    assert pct(0.873) == "87.3%" and pct(1) == "100.0%" and pct(None) == "\u2014" and pct(float("nan")) == "\u2014"
    assert pct(0.5, 0) == "50%"
    assert signed(0.021) == "+2.1 pts" and signed(-0.03) == "\u22123.0 pts" and signed(0.0001) == "\u00b10.0 pts"
    assert signed(None) == "\u2014"
    assert [sign_class(d) for d in (0.01, -0.01, 0.0001, None)] == ["pos", "neg", "zero", "zero"]
    assert (num(1.23456, 3, sign=True), num(-0.5, 1), num(-0.0001, 3, sign=True), num(None)) == (
        "+1.235", "\u22120.5", "0.000", "\u2014")


def test_ago():
    assert ago(NOW - timedelta(seconds=3), now=NOW) == "just now"
    assert ago(NOW - timedelta(seconds=42), now=NOW) == "42 s ago"
    assert ago(NOW - timedelta(minutes=3, seconds=20), now=NOW) == "3 min ago"
    assert ago(NOW - timedelta(hours=5), now=NOW) == "5 h ago"
    assert ago(NOW - timedelta(days=1), now=NOW) == "1 day ago" and ago(NOW - timedelta(days=3), now=NOW) == "3 days ago"
    assert ago(NOW - timedelta(days=90), now=NOW) == "2024-11-02"
    assert ago(NOW.replace(tzinfo=None) - timedelta(minutes=2), now=NOW) == "2 min ago"  # naive is UTC
    assert ago(NOW + timedelta(minutes=5), now=NOW) == "in 5 min" and ago(None) == "\u2014"


def test_short_hash_query_and_url():
    assert short_hash("sha256:9f86d081884c7d659a2feaa0c55ad015") == "9f86d081"
    assert short_hash("abcdef0123456789", 4) == "abcd" and short_hash(None) == ""
    assert query_string({"a": "x y", "b": None, "c": ""}, page=2) == "?a=x+y&page=2"
    assert query_string({}) == ""
    assert url("model", model="demo", **{"class": "a&b"}) == "/models/demo?class=a%26b"
    assert url("image", {"model": "m/../x", "id": "a/../b"}) == "/models/m%2F..%2Fx/images/view?id=a%2F..%2Fb"
    with pytest.raises(KeyError, match="needs model"):
        url("history")
    with pytest.raises(KeyError, match="no page route"):
        url("nope")
