"""MkDocs hook: the configuration page is the reference that ``train.py --help`` prints.

Generated from the schema's dataclasses at build time, so it cannot drift from what
``load_config`` accepts.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs' hook signature)
    if MARKER not in markdown:
        return markdown
    sys.path.insert(0, str(Path(config["config_file_path"]).parent / "src"))
    from reasonmaxxer.config.reference import config_reference

    return markdown.replace(MARKER, "```text\n" + config_reference().strip("\n") + "\n```")
