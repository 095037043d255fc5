"""Generated tables live in the docs between ``<!-- TAG:NAME -->`` markers, one per producer.

Benchmarks (``bench/``) and the privacy sweep rewrite only their own section, so the prose
around a table stays as written and a re-run refreshes the numbers in place.
"""

from __future__ import annotations

import re
from pathlib import Path


def write_section(doc: Path, name: str, body: str, *, header: str, tag: str) -> None:
    """Replace (or append) the section between ``<!-- TAG:NAME -->`` markers of ``doc``; a
    missing ``doc`` starts from ``header``."""
    start, end = f"<!-- {tag}:{name} -->", f"<!-- /{tag}:{name} -->"
    text = doc.read_text() if doc.exists() else header
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
