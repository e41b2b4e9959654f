"""``pr-preview demo``: the lifecycle demo on moto (``make demo``).

The demo lives with the local stack, the top-level ``local_stack`` package of a checkout. It is
not installed with ``pip install .`` and ``deployments`` does not import it: this command finds
the demo by its module name and, without a checkout, says where the demo runs.
"""

from __future__ import annotations

import argparse
import importlib

from deployments.cli.common import CliError, _one_line

DEMO_MODULE = "local_stack.demo"  # `python -m local_stack.demo`, as `make demo` runs it


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module(DEMO_MODULE)
    except ImportError as exc:
        raise CliError(
            f"the demo runs from a checkout of the repository, with `make demo` ({_one_line(exc)})"
        ) from exc
    code: int = demo.main(["--keep"] if args.keep else [])
    return code
