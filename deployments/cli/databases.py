"""``pr-preview refresh-template``: rebuild the template every preview database is cloned from
(``database: per-preview``), on the database host over SSM."""

from __future__ import annotations

import argparse

from deployments.cli.common import _clients, _config


def cmd_refresh_template(args: argparse.Namespace) -> int:
    from tasks.steps.database import refresh_template

    settings = _config(args)
    if settings.database != "per-preview":
        print("refresh-template is for database: per-preview (set db_instance_id).")
        return 2
    size = refresh_template(
        _clients(settings),
        settings,
        source_database=args.from_database,
        dump_file=args.from_dump,
    )
    print(
        f"Template {settings.template_database} on {settings.db_instance_id} rebuilt"
        f" ({size / 1024 / 1024:.1f} MB); new preview databases are cloned from it."
    )
    return 0
