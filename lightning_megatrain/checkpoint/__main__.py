"""``python -m lightning_megatrain.checkpoint``: the ``megatrain-checkpoint`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
