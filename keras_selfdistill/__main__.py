"""Command line: `python -m keras_selfdistill demo [options]`."""

import os
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo":
        print(
            "usage: python -m keras_selfdistill demo [--help]\n"
            "  demo  teacher -> student distillation on the bundled MNIST "
            "digits",
            file=sys.stderr,
        )
        return 2
    # TensorFlow's start-up banner would bury the demo's table.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_selfdistill import demo

    try:
        demo.main(argv[1:])
    except (FileExistsError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
