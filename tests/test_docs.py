"""The README is read in five minutes and its links lead somewhere: at most 200 lines, the two set-up
commands first, CI running exactly the test command it shows, every relative link in README, DESIGN
and docs/ pointing at a file (and heading) that exists, and nothing sending users to ../shared."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "DESIGN.md", "BENCHMARKS.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    return open(os.path.join(REPO, path), encoding="utf-8").read()


def code_blocks(text):
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readme_is_short_and_starts_with_the_two_setup_commands():
    text = read("README.md")
    assert len(text.splitlines()) <= 200
    demo, tests = code_blocks(text)[:2]
    assert "pip install -r requirements.txt" in demo and "cli.py demo" in demo
    assert "pytest" in tests and "requirements.txt" in tests
    ci = read(".ci/run")
    assert tests.strip() in ci  # CI runs exactly the README's test command


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    text, broken = read(doc), []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(REPO, file)):
            broken.append(f"{target}: no file {file}")
        elif anchor and file.endswith(".md") and anchor not in anchors(read(file)):
            broken.append(f"{target}: no heading #{anchor} in {file}")
    assert broken == []


@pytest.mark.parametrize("doc", ["README.md", "DESIGN.md"] + [d for d in DOCS if d.startswith("docs")])
def test_users_are_never_sent_to_the_shared_folder(doc):
    assert "../shared" not in read(doc)


def test_the_anchor_rule_matches_githubs():
    assert slug("Stage one: `cli.py extract`") == "stage-one-clipy-extract"
    assert slug("Distill and the objectives") == "distill-and-the-objectives"
