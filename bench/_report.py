"""Writing benchmark tables into docs/benchmarks.md, one marked section per benchmark."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from experiments import doc_sections

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Each section is written by the benchmark named in it; re-run the command to refresh it.
Timings depend on the machine: compare the ratios within a section (measured in one run), not
absolute numbers across machines.
"""


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- bench:NAME -->`` markers."""
    doc_sections.write_section(DOC, name, body, header=HEADER, tag="bench")


def bench_main(
    name: str, doc: str | None, intro: Callable[[], str], run: Callable[[bool], str]
) -> None:
    """The command line every benchmark shares: ``[--quick] [--write-docs]``.

    ``run(quick)`` returns the markdown table; with ``--write-docs`` it goes into this
    benchmark's section of docs/benchmarks.md after ``intro()`` (heading, command, machine).
    """
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="write the table into docs/benchmarks.md"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    table = run(args.quick)
    print()
    print(table)
    if args.write_docs:
        write_section(name, f"{intro()}\n\n{table}\n")
