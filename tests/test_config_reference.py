"""docs/config.md is generated from the config dataclasses: it must list every key, as the code has it."""

import dataclasses

from facetrec.config import TrainConfig
from facetrec.config_reference import FILLED_BY_TRAINING, field_comments, reference_markdown
from tests.conftest import ROOT


def test_docs_config_md_is_the_generated_reference():
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == reference_markdown(), (
        "docs/config.md is out of date with the config dataclasses: regenerate it with "
        "`.venv/bin/python -m facetrec.config_reference > docs/config.md`")


def test_every_config_key_has_a_comment_and_a_row():
    from facetrec.config_reference import _sections

    page = reference_markdown()
    for title, cls, _ in _sections():
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name in FILLED_BY_TRAINING:
                continue
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no line comment: it is the key's documentation"
            assert f"| `{f.name}` |" in page
    # the comment is the one on the field's own line
    assert field_comments(TrainConfig)["patience"] == "early stopping: epochs without a better valid metric"
