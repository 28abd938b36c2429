"""Every `docs/<file>.md#anchor` pointer in the code, tests and README leads to a file and heading that exist, and
nothing points outside the repository. Anchors are GitHub's heading slugs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")    # a file under docs/, optionally #heading-anchor
LINK = re.compile(r"\]\(([\w.-]*\.md)?(?:#([\w-]+))?\)")       # markdown links inside docs/: (other.md#x), (#x)
# the project's private notes, not in the repository (spelt in pieces so that this file does not name them)
OUTSIDE = ("HIRES_LLAVA" + ".md", "CONVENTIONS" + ".md", ".." + "/shared")


def slug(heading):
    """GitHub's anchor of a heading: link text kept, lower-case, punctuation other than '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md):
    """The anchors of a markdown file's headings (outside code fences); repeats get -1, -2, ... as on GitHub."""
    seen, fenced = {}, False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
            yield s if seen[s] == 0 else f"{s}-{seen[s]}"


def sources(root):
    return sorted(root.glob("*.py")) + sorted(root.glob("tests/*.py")) + [root / "README.md"]


def problems(root):
    """-> (number of docs references found, list of problems) for the repository at root."""
    docs, found, out = root / "docs", 0, []
    heads = {md.name: set(anchors(md)) for md in docs.glob("*.md")}

    def check(where, name, anchor):
        if name not in heads:
            out.append(f"{where}: docs/{name} does not exist")
        elif anchor and anchor not in heads[name]:
            out.append(f"{where}: docs/{name} has no heading with anchor #{anchor}")

    for path in sources(root) + sorted(docs.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(root)
        out += [f"{where}: mentions {o}, which is not in the repository" for o in OUTSIDE if o in text]
        for lineno, line in enumerate(text.splitlines(), 1):
            refs = REFERENCE.findall(line) if path.parent != docs else \
                [(name or path.name, anchor) for name, anchor in LINK.findall(line)]
            for name, anchor in refs:
                found += 1
                check(f"{where}:{lineno}", name, anchor)
    return found, out


def test_slug_follows_github():
    assert slug("SliceRestore Adapter (SRA)") == "slicerestore-adapter-sra"
    assert slug("POPE yes or no") == "pope-yes-or-no"
    assert slug("llava-w") == "llava-w"
    assert slug("The `tiny` preset: what [it](x.md) is") == "the-tiny-preset-what-it-is"


def test_every_docs_reference_resolves():
    found, bad = problems(ROOT)
    assert found >= 40, f"only {found} docs references found: the scan is not reading the sources"
    assert bad == []


def test_checker_catches_bad_references(tmp_path):
    """The checker itself: a missing file, a missing heading, a bad link inside docs/ and an outside pointer."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Good heading\n\n```\n# not a heading\n```\n"
                                            "See [x](#good-heading), [y](#nope) and [z](b.md#title).\n")
    write = lambda path, text: path.write_text(text.replace("DOCS", "docs").replace("OUT", ".." + "/shared"))
    write(tmp_path / "README.md", "DOCS/a.md#good-heading and DOCS/a.md#not-a-heading\n")
    write(tmp_path / "m.py", f"# see DOCS/missing.md and OUT/{OUTSIDE[0]}\n")
    write(tmp_path / "tests" / "t.py", f'"""DOCS/a.md#title, {OUTSIDE[1]} 1.2"""\n')
    found, bad = problems(tmp_path)
    assert found == 7
    assert sorted(bad) == sorted([e.replace("DOCS", "docs") for e in (
        "README.md:1: DOCS/a.md has no heading with anchor #not-a-heading",
        "DOCS/a.md:8: DOCS/a.md has no heading with anchor #nope",
        "DOCS/a.md:8: DOCS/b.md does not exist",
        "m.py:1: DOCS/missing.md does not exist",
        f"m.py: mentions {OUTSIDE[0]}, which is not in the repository",
        f"m.py: mentions {OUTSIDE[2]}, which is not in the repository",
        f"tests/t.py: mentions {OUTSIDE[1]}, which is not in the repository")])


def test_readme_tables_are_copied_from_results_files():
    """The README's tiler cost table is bench.py's own output (results/bench_tilers.txt) and its EntityGrid-QA
    figures of the tilers are those of the runs' metrics.json files (results/tilers/): copied, never retyped."""
    import json
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bench = (ROOT / "results" / "bench_tilers.txt").read_text(encoding="utf-8")
    block = readme.split("<!-- bench.py tilers -->")[1].split("```")[1]
    assert block.strip() and all(line in bench.splitlines() for line in block.strip("\n").splitlines())
    rows = [line for line in readme.split("<!-- results/tilers -->")[1].split("\n\n")[0].splitlines()
            if line.startswith("| `")]
    assert len(rows) == 4
    for row in rows:
        tiler = row.split("`")[1].split()[-1]
        with open(ROOT / "results" / "tilers" / f"{tiler}.json") as f:
            m = json.load(f)
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert cells[:4] == [f"{m['accuracy']:.3f}", f"{m['edge_accuracy']:.3f}", f"{m['other_accuracy']:.3f}",
                             f"{m['other_accuracy'] - m['edge_accuracy']:+.3f}"], tiler
