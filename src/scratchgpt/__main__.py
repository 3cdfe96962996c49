"""`python -m scratchgpt ...` (also what torchrun runs) is the same as the `scratchgpt` console script."""

from scratchgpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
