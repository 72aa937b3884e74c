"""MkDocs hooks of the site (mkdocs.yml ``hooks:``).

``docs/asyncio.md`` (the asyncio guide) is written alongside the rest of the site: it is
listed under Guides when it exists, so the strict build neither fails while it does not
nor leaves it out of the navigation (a page outside the nav is a strict-mode warning)
once it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

OPTIONAL_GUIDES = {"asyncio.md": "asyncio"}


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    for section in config["nav"]:
        if isinstance(section, dict) and "Guides" in section:
            guides = section["Guides"]
            listed = {page for entry in guides for page in entry.values()}
            for page, title in OPTIONAL_GUIDES.items():
                if (docs / page).is_file() and page not in listed:
                    guides.insert(1, {title: page})
    return config
