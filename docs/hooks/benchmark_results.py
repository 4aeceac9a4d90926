"""MkDocs hook: publish the committed benchmark results with the site, without a second copy.

The docs link to figures where the studies write them, `benchmarks/results/` at the repository
root (from `docs/studies/x.md`: `../../benchmarks/results/x.png`), so the same links work in any
viewer that renders Markdown from the repository. MkDocs publishes only files under `docs/`, so
this hook (listed under `hooks:` in mkdocs.yml) adds every file of `benchmarks/results/` to the
site at the same path and rewrites the links that leave `docs/` for it. A link to a result that
does not exist is rewritten all the same, so `mkdocs build --strict` reports it and fails.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = "benchmarks/results"
# The target of a Markdown link or image: `](target)` or `](target "title")`.
_LINK_TARGET = re.compile(r"(\]\()([^)\s]+)")


def on_files(files, config):
    root = Path(config["docs_dir"]).resolve().parent
    for path in sorted((root / RESULTS).rglob("*")):
        # Markdown among the results (a study's report.md) would become a page outside the nav; the
        # site links to the JSON and figures, so it is left to the repository view.
        if path.is_file() and path.suffix not in (".tmp", ".md"):
            src_uri = path.relative_to(root).as_posix()
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)  # relative to docs/

    def to_site(match: re.Match) -> str:
        target = match.group(2)
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not in_repo.startswith(RESULTS + "/"):
            return match.group(0)
        return match.group(1) + posixpath.relpath(in_repo, page_dir or ".")

    return _LINK_TARGET.sub(to_site, markdown)
