"""`python -m scratchgpt ...` (also what torchrun runs) is the same as the `scratchgpt` console script."""

import sys

if __name__ == "__main__":
    try:
        from scratchgpt.cli import run
    except KeyboardInterrupt:  # Ctrl-C while the package is still being imported
        print("scratchgpt: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    run()
