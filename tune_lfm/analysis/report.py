"""A report as a list of blocks (headings, paragraphs, tables, images) rendered to markdown and to HTML.

Building the content once and rendering it twice keeps report.md, report.html and the printed tables identical.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd

from .formatting import format_frame


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    frame: pd.DataFrame
    """Raw values; formatted by `formatting.format_value` on rendering."""


@dataclass
class Image:
    path: str
    """Relative to the report's directory."""
    alt: str


Block = Heading | Paragraph | Table | Image


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(frame: pd.DataFrame) -> str:
    cells = format_frame(frame)
    lines = ["| " + " | ".join(map(_markdown_cell, map(str, cells.columns))) + " |",
             "|" + "---|" * len(cells.columns)]
    lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(blocks: list[Block], images: bool = True) -> str:
    """Markdown text; `images=False` leaves the image links out (for printing to a terminal)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(_markdown_table(block.frame))
        elif images:
            parts.append(f"![{block.alt}]({block.path})")
    return "\n\n".join(parts) + "\n"


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
         "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
         "img{max-width:100%}")


def _html_table(frame: pd.DataFrame) -> str:
    cells = format_frame(frame)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cells.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                   for row in cells.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(blocks: list[Block], title: str) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block.frame))
        else:
            parts.append(f'<img src="{html.escape(block.path)}" alt="{html.escape(block.alt)}">')
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
