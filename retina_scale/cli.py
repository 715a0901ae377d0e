"""The one console entry point: ``retina-scale <subcommand>``.

Each subcommand lives in its own module under ``retina_scale.commands`` and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import TensorFlow only inside
``run`` so that ``retina-scale --help`` stays fast. To add a subcommand, add one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "complexity": (
        "retina_scale.commands.complexity",
        "weights, multiply-adds and activations of every stage, beside the paper's figures",
    ),
    "train": ("retina_scale.commands.train", "train the ladder of stages (the main job; resumable)"),
    "evaluate": ("retina_scale.commands.evaluate", "kappa, Table IV rows and referable-DR figures of a model, with intervals"),
    "synth": ("retina_scale.commands.synth", "write the synthetic DR data set (EyePACS layout) or its gallery"),
    "prepare": ("retina_scale.commands.prepare", "preprocess a fundus data set once per scale into a training cache"),
    "export": ("retina_scale.commands.export", "export a run's stage as a SavedModel version for TF Serving"),
    "predict": ("retina_scale.commands.predict", "grade a folder or CSV of photos with an export, to a CSV"),
    "tune": ("retina_scale.commands.tune", "search one stage's learning rate with Keras Tuner (resumable, distributable)"),
    "report": ("retina_scale.commands.report", "the resolution report of a run or study: tables, figures, REPORT.md"),
    "study": ("retina_scale.commands.study", "the resolution study: the ladder, the top stage from scratch, throughput, report"),
    "explain": ("retina_scale.commands.explain", "Grad-CAM heat maps of a stage or export on any photos: PNG overlays, lesion hit rates"),
}


# OSErrors that the person running the command fixes (a full disk, a read-only or forbidden folder), by errno:
# one line, exit 2, like a UserError. Any other OSError keeps its traceback.
_OS_ERROR_HINTS = {
    errno.ENOSPC: ("write", "the disk is full: free some space or write elsewhere"),
    getattr(errno, "EDQUOT", -1): ("write", "the disk quota is used up: free some space or write elsewhere"),
    errno.EROFS: ("write", "the file system is read-only: write elsewhere"),
    errno.EACCES: ("access", "no permission: fix the folder's permissions or write elsewhere"),
    errno.EPERM: ("access", "operation not permitted: fix the folder's permissions or write elsewhere"),
    errno.ENOTDIR: ("access", "a part of the path is a file, not a folder"),
}


def os_error_line(exc: OSError) -> str | None:
    """The one line for an OSError the user can fix (disk full, read-only, no permission, a file in the path),
    or None for any other.

    >>> os_error_line(OSError(errno.ENOSPC, "No space left on device", "runs/quick/last.npz"))
    'cannot write runs/quick/last.npz: No space left on device (ENOSPC: the disk is full: free some space or write elsewhere)'
    """
    if exc.errno not in _OS_ERROR_HINTS:
        return None
    verb, hint = _OS_ERROR_HINTS[exc.errno]
    where = f" {exc.filename}" if exc.filename is not None else ""
    return f"cannot {verb}{where}: {exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)}: {hint})"


def build_parser() -> argparse.ArgumentParser:
    from retina_scale import __version__

    parser = argparse.ArgumentParser(
        prog="retina-scale",
        description="Multi-scale stepwise training of CNNs for diabetic retinopathy grading.",
    )
    parser.add_argument("--version", action="version", version=f"retina-scale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--verbose", action="store_true",
                       help="show TensorFlow's own (C++) log lines and per-step progress, hidden by default")
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None, *, console: bool | None = None) -> int:
    """Runs ``retina-scale <subcommand>``; returns the exit status.

    Args:
        argv: the arguments (default: the command line's).
        console: filter TensorFlow's C++ log lines out of this process's standard error (file descriptor 2,
            see ``retina_scale.utils.console``); default: when ``argv`` is None, i.e. when run as a program
            (not when a test or a script calls ``main([...])`` inside its own process).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    if args.verbose:
        os.environ["RETINA_SCALE_VERBOSE"] = "1"  # child processes too
    else:
        # TensorFlow's C++ chatter (no CUDA driver, oneDNN, grappler's remapper) is noise to a person.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if console if console is not None else argv is None:
            from retina_scale.utils.console import quiet_native_logs

            quiet_native_logs()
    from retina_scale.utils.errors import UserError

    try:
        return int(args._module.run(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as exc:
        # One clear line for a user error; any other exception is a bug and keeps its traceback.
        print(f"retina-scale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        line = os_error_line(exc)
        if line is None:  # a bug or a broken machine: keep the traceback
            raise
        print(f"retina-scale {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retina-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
