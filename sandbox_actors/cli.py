"""The ``sandbox-actors`` command line."""

from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_IMAGE
from .errors import SandboxError


def _build_image(args: argparse.Namespace) -> int:
    from .image import build_image

    build_image(args.tag, force=args.force, progress=lambda line: print(line, flush=True))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sandbox-actors", description="Sandboxes for AI-agent threads on Ray.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build-image", help="build the minimal sandbox image locally (no registry)")
    build.add_argument("--tag", default=DEFAULT_IMAGE, help=f"image to produce (default {DEFAULT_IMAGE})")
    build.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    build.set_defaults(run=_build_image)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
