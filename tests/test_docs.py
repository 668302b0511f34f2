"""The README is read in five minutes and its links lead somewhere: at most 200 lines, the two set-up
commands first, CI running exactly the test command it shows, every relative link in README, DESIGN
and docs/ pointing at a file (and heading) that exists, every section of docs/ leading to its code
through a "code:" line whose names the code defines, and nothing sending users to ../shared."""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "DESIGN.md", "BENCHMARKS.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# "code: [path.py](../path.py) `function`, `Class.method` [other.py](../other.py) `name`": each name is
# defined at the top of the file linked before it
CODE_LINE = re.compile(r"^code: .*$", re.M)
CODE_TOKEN = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|`([A-Za-z_][\w.]*)`")
# pages of symptoms and fixes rather than of parts of the code; sections on what is not there
NO_CODE_PAGES = {"docs/troubleshooting.md"}
NO_CODE_SECTION = re.compile(r"^Not ")


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


def defined_names(path):
    """{"name", "Class.method"} defined at the top of a Python file."""
    names = set()
    for node in ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def code_line_problems(doc, text):
    problems = []
    for line in CODE_LINE.findall(text):
        file, names = None, 0
        for target, name in CODE_TOKEN.findall(line):
            if target:
                if names == 0 and file:
                    problems.append(f"{line!r}: no name after {file}")
                file, names = os.path.normpath(os.path.join(os.path.dirname(doc), target)), 0
                if not (file.endswith(".py") and os.path.isfile(os.path.join(REPO, file))):
                    problems.append(f"{line!r}: {target} is not a Python file of the repository")
                    file = None
            elif file is None:
                problems.append(f"{line!r}: `{name}` follows no Python file")
            else:
                names += 1
                if name not in defined_names(file):
                    problems.append(f"{line!r}: {file} defines no {name}")
        if file and names == 0:
            problems.append(f"{line!r}: no name after {file}")
    return problems


@pytest.mark.parametrize("doc", [d for d in DOCS if d.startswith("docs")])
def test_every_code_line_names_code_that_exists(doc):
    assert code_line_problems(doc, read(doc)) == []


@pytest.mark.parametrize("doc", [d for d in DOCS if d.startswith("docs") and d not in NO_CODE_PAGES])
def test_every_section_of_the_docs_leads_to_its_code(doc):
    sections = re.split(r"^## ", read(doc), flags=re.M)[1:]  # each with its ### subsections
    missing = [s.splitlines()[0] for s in sections if not NO_CODE_SECTION.match(s) and not CODE_LINE.search(s)]
    assert missing == []


def test_a_code_line_that_rotted_is_named():
    doc = "docs/eval.md"
    good = "code: [pipeline/evaluate/protocols.py](../pipeline/evaluate/protocols.py) `linear_probe`, `fit_logreg`"
    assert code_line_problems(doc, good) == []
    assert code_line_problems(doc, good.replace("`fit_logreg`", "`fit_probe`")) == \
        [f"{good.replace('`fit_logreg`', '`fit_probe`')!r}: pipeline/evaluate/protocols.py defines no fit_probe"]
    assert code_line_problems(doc, good.replace("protocols.py)", "protocol.py)"))[0].endswith(
        "../pipeline/evaluate/protocol.py is not a Python file of the repository")
    method = "code: [cache/reader.py](../../cache/reader.py) `CacheReader.read`"
    assert code_line_problems("docs/eval.md", method)[0].endswith("is not a Python file of the repository")
    assert code_line_problems("docs/eval.md", method.replace("../../", "../")) == []


@pytest.mark.parametrize("doc", ["README.md", "DESIGN.md"] + [d for d in DOCS if d.startswith("docs")])
def test_users_are_never_sent_to_the_shared_folder(doc):
    assert "../shared" not in read(doc)


def test_the_anchor_rule_matches_githubs():
    assert slug("Stage one: `cli.py extract`") == "stage-one-clipy-extract"
    assert slug("Distill and the objectives") == "distill-and-the-objectives"
