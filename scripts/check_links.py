"""Check that the links and repository paths in README.md and docs/*.md resolve.

    python scripts/check_links.py            # exit code 1 and a list if anything is missing

Checks Markdown links and images (relative files, and #anchors against the target's headings, GitHub-style) and
repository paths written in backticks (`potentials/...`, `tests/...`, `benchmarks/...`, ...). Web links are not
fetched.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:potentials|tests|benchmarks|scripts|docs|conf)/[^`\s*<>{}]*)`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def check(md: Path) -> list[str]:
    problems = []
    text = md.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            problems.append(f"{md.relative_to(ROOT)}: link to missing {target}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{md.relative_to(ROOT)}: no heading for #{anchor} in {dest.relative_to(ROOT)}")
    for path in CODE_PATH.findall(text):
        if not (ROOT / path.split("::")[0].rstrip(".,:;")).exists():
            problems.append(f"{md.relative_to(ROOT)}: path `{path}` does not exist")
    return problems


def main() -> int:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [p for md in files for p in check(md)]
    print("\n".join(problems) or f"all links and paths in {len(files)} files resolve")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
