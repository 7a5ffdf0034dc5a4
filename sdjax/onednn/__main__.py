"""``python -m sdjax.onednn build``: compile the oneDNN handlers into the cache and check them.

``python -m sdjax.onednn info`` prints whether the route is available and where it lives.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdjax.onednn", description=__doc__)
    parser.add_argument("command", choices=("build", "info"))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)

    from sdjax import onednn

    if args.command == "build":
        try:
            path = onednn.build(force=args.force)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        print(path)
    reason = onednn.unavailable_reason()
    if reason is not None:
        print(f"oneDNN route unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"oneDNN route available: {onednn.library_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
