"""HTML building blocks of the report: one self-contained page (inline CSS,
images as base64 data URIs), every text escaped."""

import base64
import html
from typing import Iterable, List, Optional, Sequence

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 16px 28px; color: #1a1a1a;
       font-size: 15px; line-height: 1.45; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 21px; border-bottom: 2px solid #ddd; padding-bottom: 4px;
     margin-top: 36px; }
h3 { font-size: 17px; margin-top: 22px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 14px 0; font-size: 14px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 9px; }
th { background: #f2f2f2; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.name { text-align: left; font-family: monospace; }
th.baseline, td.baseline { color: #555; background: #fafafa; }
td.best { font-weight: bold; }
tr.count td { color: #666; }
p.na { color: #8a5a00; background: #fff8e6; border-left: 4px solid #e0a800;
       padding: 6px 10px; }
p.caption, p.meta { color: #555; font-size: 13px; margin-top: 2px; }
ul.problems { color: #8a1f11; }
img.figure { max-width: 100%; height: auto; display: block;
             margin: 10px 0 6px 0; }
details { margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: 10px;
      overflow-x: auto; font-size: 12.5px; }
"""


def esc(text) -> str:
  return html.escape(str(text), quote=True)


def page(title: str, body: Iterable[str]) -> str:
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">"
          f"\n<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
          "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def section(anchor: str, title: str, parts: Iterable[str]) -> str:
  return (f'<section id="{esc(anchor)}">\n<h2>{esc(title)}</h2>\n' +
          "\n".join(parts) + "\n</section>")


def heading(text: str) -> str:
  return f"<h3>{esc(text)}</h3>"


def paragraph(text: str, cls: Optional[str] = None) -> str:
  attr = f' class="{cls}"' if cls else ""
  return f"<p{attr}>{esc(text)}</p>"


def not_available(why: str, lead: str = "not available") -> str:
  """The note shown in place of a missing part of the report."""
  return paragraph(f"{lead}: {why}", "na")


def image(png: bytes, alt: str) -> str:
  data = base64.b64encode(png).decode("ascii")
  return (f'<img class="figure" alt="{esc(alt)}" '
          f'src="data:image/png;base64,{data}">')


def bullet_list(items: Sequence[str], cls: Optional[str] = None) -> str:
  attr = f' class="{cls}"' if cls else ""
  return (f"<ul{attr}>" + "".join(f"<li>{esc(i)}</li>" for i in items) +
          "</ul>")


def details(summary: str, body: str, open_: bool = False) -> str:
  flag = " open" if open_ else ""
  return (f"<details{flag}><summary>{esc(summary)}</summary>\n{body}\n"
          "</details>")


def preformatted(text: str) -> str:
  return f"<pre>{esc(text)}</pre>"


def nav(links: Sequence[tuple]) -> str:
  return "<nav>" + "".join(f'<a href="#{esc(a)}">{esc(t)}</a>'
                           for a, t in links) + "</nav>"


class Cell:
  """A table cell: text, and CSS classes (num, name, best, baseline)."""

  def __init__(self, text, *classes: str):
    self.text = "" if text is None else str(text)
    self.classes = [c for c in classes if c]

  def render(self, tag: str = "td") -> str:
    cls = f' class="{" ".join(self.classes)}"' if self.classes else ""
    return f"<{tag}{cls}>{esc(self.text)}</{tag}>"


def table(header: Sequence[Cell], rows: Sequence[Sequence[Cell]],
          row_classes: Optional[Sequence[str]] = None,
          caption: Optional[str] = None) -> str:
  out: List[str] = ["<table>", "<tr>" + "".join(c.render("th")
                                                for c in header) + "</tr>"]
  for i, row in enumerate(rows):
    cls = row_classes[i] if row_classes and row_classes[i] else ""
    attr = f' class="{cls}"' if cls else ""
    out.append(f"<tr{attr}>" + "".join(c.render() for c in row) + "</tr>")
  out.append("</table>")
  if caption:
    out.append(paragraph(caption, "caption"))
  return "\n".join(out)


def number(v: Optional[float], count: bool = False) -> str:
  """A metric for a table: counts and ints as integers, else 4 decimals
  for values below 1 (HR, NDCG), fewer for larger ones (BLEU)."""
  if v is None:
    return "—"
  if count or isinstance(v, int):
    return f"{int(round(v)):,}"
  a = abs(v)
  if a >= 100:
    return f"{v:.1f}"
  if a >= 1:
    return f"{v:.3f}"
  return f"{v:.4f}"
