"""MkDocs hook: measured numbers in the docs come from data files, never from typed text.

Each ``docs/numbers/<file>.json`` holds ``{"command": ..., "date": ..., "machine": ..., "values": {...}}``, written by a
script in ``benchmarks/numbers/`` (or a benchmark's ``--write-numbers``). In the markdown:

- ``{{ numbers.<file>.<key>[.<key>...] }}``: a value. A summary of repeated runs (a dict with ``mean`` and ``sd``)
  renders as ``mean ± sd``; ``.mean``, ``.sd``, ``.min``, ``.max``, ``.n`` pick one part, ``.range`` gives
  ``min–max`` and ``.runs`` the single runs.
- ``{{ table.<file>.<key> }}``: a markdown table from ``{"columns": [...], "rows": [[...], ...]}``.
- ``{{ provenance.<file> }}``: the line saying which command wrote the numbers, when and on what machine.
- ``{{ numbers_or_todo.<file> }} ... {{ end_numbers_or_todo }}``: the enclosed text when the file exists, otherwise
  a note "not measured on this version yet: run `<command>`". The command is
  ``python benchmarks/numbers/<file>.py`` unless given after a bar, ``{{ numbers_or_todo.<file> | <command> }}``; the
  script it names must exist.

An unknown file, an unknown key, a file without command / date / machine or any other ``{{ ... }}`` raises
(``PluginError``), so ``mkdocs build`` fails, in ``--strict`` mode or not.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

from mkdocs.exceptions import PluginError

REQUIRED = ("command", "date", "machine", "values")
SUMMARY_PARTS = ("mean", "sd", "min", "max", "n", "runs", "range")
BLOCK = re.compile(r"\{\{\s*numbers_or_todo\.([A-Za-z0-9_]+)\s*(?:\|\s*(.*?))?\s*\}\}(.*?)\{\{\s*end_numbers_or_todo\s*\}\}",
                   re.S)
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
REF = re.compile(r"^\s*(numbers|table|provenance)\.([A-Za-z0-9_]+)((?:\.[A-Za-z0-9_\-]+)*)\s*$")

_numbers: dict[str, dict] = {}
_repo = Path(__file__).resolve().parents[2]  # docs/hooks/numbers.py -> the repository


def load_numbers(numbers_dir: Path) -> dict[str, dict]:
    """Every ``<numbers_dir>/*.json`` by file stem, each checked for command, date, machine and values."""
    out = {}
    for path in sorted(Path(numbers_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PluginError(f"{path}: not valid JSON ({e}); rerun the script that writes it") from None
        missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
        if missing:
            raise PluginError(f"{path}: missing {missing}; a numbers file holds {list(REQUIRED)} "
                              "(benchmarks/numbers/_common.py write_numbers writes them)")
        out[path.stem] = data
    return out


def fmt(v) -> str:
    """A value as text: floats to 4 significant digits (trailing zeros kept off), None / NaN as NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "NaN"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, dict) and "mean" in v and "sd" in v:
        return f"{fmt(v['mean'])} ± {fmt(v['sd'])}"
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        raise ValueError("a dict that is not a summary (mean, sd, ...): name one of its keys")
    return str(v)


def lookup(numbers: dict, file: str, keys: list[str], where: str):
    """The value at ``values.<keys>`` of numbers file ``file``; a PluginError naming ``where`` otherwise."""
    if file not in numbers:
        raise PluginError(f"{where}: no docs/numbers/{file}.json (have: {sorted(numbers)}); run the script that "
                          f"writes it or wrap the text in {{{{ numbers_or_todo.{file} }}}} ... {{{{ end_numbers_or_todo }}}}")
    v = numbers[file]["values"]
    for i, k in enumerate(keys):
        if isinstance(v, dict) and "mean" in v and "sd" in v and k == "range":
            return f"{fmt(v['min'])}–{fmt(v['max'])}"
        if not isinstance(v, dict) or k not in v:
            have = sorted(v) if isinstance(v, dict) else type(v).__name__
            raise PluginError(f"{where}: numbers.{file}.{'.'.join(keys[:i + 1])}: no key {k!r} in "
                              f"docs/numbers/{file}.json (there: {have})")
        v = v[k]
    return v


def table(value, where: str) -> str:
    if not (isinstance(value, dict) and isinstance(value.get("columns"), list) and isinstance(value.get("rows"), list)):
        raise PluginError(f"{where}: a table is {{'columns': [...], 'rows': [[...], ...]}}")
    cols = value["columns"]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + " --- |" * len(cols)]
    for row in value["rows"]:
        if len(row) != len(cols):
            raise PluginError(f"{where}: a row of {len(row)} cells under {len(cols)} columns: {row}")
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def provenance(numbers: dict, file: str, where: str) -> str:
    lookup(numbers, file, [], where)
    d = numbers[file]
    return (f"*Measured with `{d['command']}` on {d['date']}, on {d['machine']} "
            f"(`docs/numbers/{file}.json`).*")


def todo_command(file: str, command: str | None, where: str) -> str:
    command = (command or f"python benchmarks/numbers/{file}.py").strip()
    words = shlex.split(command)
    script = next((w for w in words[1:] if w.endswith(".py")), None) if words and words[0] == "python" else None
    if script is None or not (_repo / script).is_file():
        raise PluginError(f"{where}: numbers_or_todo.{file}: the command {command!r} names no script of the repo")
    return command


def render(markdown: str, numbers: dict, where: str) -> str:
    """``markdown`` with every placeholder replaced (see the module docstring)."""
    def block(m: re.Match) -> str:
        file, command, body = m.group(1), m.group(2), m.group(3)
        if file in numbers:
            return body
        cmd = todo_command(file, command, where)
        return (f'\n!!! warning "Not measured on this version yet"\n'
                f"    Run `{cmd}` to write `docs/numbers/{file}.json`; the numbers of this part appear here.\n\n")

    markdown = BLOCK.sub(block, markdown)

    def one(m: re.Match) -> str:
        ref = REF.match(m.group(1))
        if ref is None:
            raise PluginError(f"{where}: unknown placeholder {m.group(0)!r} (numbers.<file>.<key>, table.<file>.<key>, "
                              "provenance.<file>, numbers_or_todo.<file> ... end_numbers_or_todo)")
        kind, file, keys = ref.group(1), ref.group(2), [k for k in ref.group(3).split(".") if k]
        if kind == "provenance":
            if keys:
                raise PluginError(f"{where}: {m.group(0)}: provenance takes a file only")
            return provenance(numbers, file, where)
        if not keys:
            raise PluginError(f"{where}: {m.group(0)}: name a key of docs/numbers/{file}.json")
        v = lookup(numbers, file, keys, where)
        if kind == "table":
            return table(v, where)
        try:
            return fmt(v)
        except ValueError as e:
            raise PluginError(f"{where}: {m.group(0)}: {e}") from None

    return PLACEHOLDER.sub(one, markdown)


def on_config(config, **kwargs):
    global _numbers, _repo
    _repo = Path(config["config_file_path"]).resolve().parent
    _numbers = load_numbers(Path(config["docs_dir"]) / "numbers")
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    return render(markdown, _numbers, page.file.src_path)
