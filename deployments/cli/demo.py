"""``pr-preview demo``: the lifecycle demo on moto (``make demo``).

The local stack is the top-level ``local_stack`` package of a checkout; it is not installed with
``pip install .``, so without a checkout this command says where the demo runs.
"""

from __future__ import annotations

import argparse

from deployments.cli.common import CliError, _one_line


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from local_stack import demo
    except ImportError as exc:
        raise CliError(
            f"the demo runs from a checkout of the repository, with `make demo` ({_one_line(exc)})"
        ) from exc
    return demo.main(["--keep"] if args.keep else [])
