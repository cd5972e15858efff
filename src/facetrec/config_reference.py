"""The configuration reference (docs/config.md), generated from the config dataclasses themselves.

Every key a YAML config or `--set` accepts is a field of one of the dataclasses below; its line
comment in the source is its documentation. This module renders them as one Markdown page so the
page cannot drift from the code (tests/test_config_reference.py regenerates and compares):

    .venv/bin/python -m facetrec.config_reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from typing import Any

from facetrec.config import DataConfig, ItemTable, PrepareConfig, RunConfig, TrainConfig

FILLED_BY_TRAINING = {"n_items"}  # model fields set from the prepared data, not by a config


def _sections() -> list[tuple[str, type, str]]:
    from facetrec.models.dien import DIENConfig
    from facetrec.models.mind import MINDConfig
    from facetrec.models.ple import PLEConfig
    from facetrec.models.uie import UIEConfig

    return [
        ("data", DataConfig, "Where the raw log is and how to read it (`facetrec prepare`)."),
        ("data.item_tables[]", ItemTable, "Each entry of `data.item_tables`: a side table of item attributes."),
        ("prepare", PrepareConfig, "Filtering, id remapping and splits."),
        ("train", TrainConfig, "Training, evaluation and the retrieval index; keys that name a model family apply to it only."),
        ("run", RunConfig, "Outputs."),
        ("model (mind, youtubednn)", MINDConfig,
         "`model.name: mind` or `youtubednn` (YouTube DNN is MIND with `n_interests: 1` and `pooling: mean`, set for you)."),
        ("model (dien, din, base)", DIENConfig, "`model.name: dien`, `din` or `base`."),
        ("model (ple, ple-uie)", PLEConfig, "`model.name: ple` or `ple-uie` (which sets `use_uie: true`)."),
        ("model.uie", UIEConfig, "The `uie:` mapping inside a `ple-uie` model section."),
    ]


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the line comment after its definition in `cls`'s source ('' when none).

    Example:
        >>> field_comments(RunConfig)["dir"]
        'where outputs go (contract key)'
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    (node,) = ast.parse(source).body
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = comments.get(stmt.end_lineno, "")
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"  # JSON is YAML: the default as a config would spell it


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The whole page, as `python -m facetrec.config_reference` prints it."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `.venv/bin/python -m facetrec.config_reference > docs/config.md`",
        "(`tests/test_config_reference.py` fails when this page and the code disagree). A config is a YAML",
        "file with the sections below (`base:` names a file it extends); `--set section.key=value` overrides",
        "any key on the command line (`--set train.epochs=3`, `--set model.n_interests=8`). An unknown key",
        "or a value of the wrong type is refused with an error naming it. Numbers quoted in a description",
        "come from `docs/benchmarks.md`, where the command that produced each sits beside it.",
        "",
    ]
    for title, cls, intro in _sections():
        comments = field_comments(cls)
        lines += [f"## {title}", "", intro, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if title.startswith("model") and f.name in FILLED_BY_TRAINING:
                continue
            kind = str(f.type)  # the annotation as written: these modules postpone annotations (PEP 563)
            lines.append(f"| `{f.name}` | `{_cell(kind)}` | {_cell(_default(f))} | {_cell(comments.get(f.name, ''))} |")
        lines.append("")
    lines += ["Not listed: `n_items`, which every model takes from the prepared data (a config that sets it is refused).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
