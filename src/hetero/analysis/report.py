"""A single self-contained ``report.html``: plain HTML + CSS, PNG figures embedded as base64.

Example usage::

    sections = {
        "Summary": [paragraph("3000 particles"), table([("run", "/runs/x")])],
        "Latent space": [image(out / "umap.png", "UMAP")],
    }
    write_report(out / "report.html", "hetero analysis", sections)
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SECTION_ORDER = ("Summary", "Training", "Latent space", "Clusters", "Decoded maps", "Reconstructed maps",
                 "Ground truth", "Files")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { background: #23395d; color: white; padding: 16px 32px; }
header h1 { margin: 0; font-size: 1.5em; }
header p { margin: 4px 0 0; opacity: 0.8; font-size: 0.9em; }
nav { padding: 8px 32px; background: #e8ecf2; font-size: 0.9em; }
nav a { margin-right: 16px; color: #23395d; text-decoration: none; }
main { padding: 8px 32px 32px; max-width: 1400px; }
section { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px 20px 16px;
          margin: 16px 0; }
h2 { color: #23395d; border-bottom: 1px solid #eee; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
th { background: #f0f3f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 8px 12px 8px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
"""


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower())


def paragraph(text: str, cls: str | None = None) -> str:
    """A ``<p>`` with escaped text."""
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"


def preformatted(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(rows: Iterable[Sequence], header: Sequence[str] | None = None) -> str:
    """An HTML table; floats are shown with 4 significant digits."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def image(path: str | Path, caption: str = "", width: int | None = None) -> str:
    """A ``<figure>`` with the PNG at ``path`` embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="max-width:{width}px"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}"{style}>'
        f"{cap}</figure>"
    )


def file_list(root: str | Path, paths: Iterable[str | Path]) -> str:
    """A ``<ul>`` of paths shown relative to ``root`` (links work when the folder is moved)."""
    root = Path(root)
    items = []
    for p in paths:
        p = Path(p)
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        items.append(f'<li><a href="{html.escape(rel)}"><code>{html.escape(rel)}</code></a></li>')
    return "<ul>" + "".join(items) + "</ul>"


def render_report(title: str, sections: Mapping[str, Sequence[str]], subtitle: str = "") -> str:
    """The report as a string. Sections appear in :data:`SECTION_ORDER` first, then any
    others; a section without content blocks is left out."""
    names = [s for s in SECTION_ORDER if s in sections] + [s for s in sections if s not in SECTION_ORDER]
    names = [s for s in names if sections[s]]
    nav = " ".join(f'<a href="#{_anchor(s)}">{html.escape(s)}</a>' for s in names)
    body = []
    for name in names:
        blocks = "\n".join(sections[name])
        body.append(f'<section id="{_anchor(name)}">\n<h2>{html.escape(name)}</h2>\n{blocks}\n</section>')
    sub = f"<p>{html.escape(subtitle)}</p>" if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1>{sub}</header>\n<nav>{nav}</nav>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def write_report(
    path: str | Path, title: str, sections: Mapping[str, Sequence[str]], subtitle: str = ""
) -> Path:
    """Write :func:`render_report` to ``path`` atomically."""
    from hetero.utils.files import write_text

    return write_text(path, render_report(title, sections, subtitle))
