"""``python -m registry list [--no-plugins]``: every kind, tag, preset and the package it came from."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m registry", description=__doc__)
    ap.add_argument("command", choices=["list"])
    ap.add_argument("--no-plugins", action="store_true", help="list the built-ins only")
    args = ap.parse_args(argv)
    import zoo  # noqa: F401
    from registry.kinds import ALL
    from registry.plugins import load_plugins

    if not args.no_plugins:
        load_plugins()
    rows = [("kind", "type", "source", "presets")]
    for kind, reg in ALL.items():
        for tag, _cls in reg.items():
            presets = [p for p in reg.presets(tag)]
            rows.append((kind, tag, reg.source(tag), " ".join(presets) if presets != ["tiny"] or reg.require_tiny else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
