"""``xenback-sim``: the simulated host as a daemon.

    xenback-sim --run-dir DIR [--domain NAME]... [-w watch-event=SECONDS]
                [--max-queued BYTES]

Serves XenStore on ``DIR/xenstored/socket`` (so ``XENSTORED_PATH`` and
``XENSTORED_RUNDIR=DIR/xenstored`` both work) and the hypervisor under
``DIR/domains``; processes join with :func:`xenback.sim.attach`.  Once
everything is ready it prints ``XENSTORED_PATH=<path>`` as its first line,
then one ``DOMAIN <name> <domid>`` line per ``--domain``.  SIGTERM, SIGINT
or SIGHUP (its terminal closed; not under ``nohup``, which ignores it)
closes everything and exits 0; a SIGINT before it takes them (as it
starts) exits 130, having made nothing.

``-w``/``--timeout watch-event=SECONDS`` is cxenstored's option of that
name: how long a watch event for a guest may wait unsent before it is
dropped (20; 0: never, as in cxenstored).  ``--max-queued BYTES`` bounds
what may wait for one guest (XenStored's ``max_queued``; cxenstored's
nearest is its memory quota, which counts much more, hence not its name).
Both are checked by the rule SimHost applies (``check_limits``), so the
command takes what the class takes: a timeout need not be whole seconds,
``inf`` is refused (0 says never), and a value past cxenstored's C ints
is taken as given, a limit never reached, not a wrapped one.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from ._domain import run_dir_argument
from ._host import SimHost, check_domain_name
from ._stdio import stdio_problem, stdio_to_devnull
from ._xenstored._server import MAX_QUEUED, MIN_QUEUED, WATCH_EVENT_TIMEOUT, check_limits

logger = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}



def _domain_name(text: str) -> str:
    # Checked before the host starts: a bad name is a usage error.
    try:
        return check_domain_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _timeout(text: str) -> tuple[str, float | None]:
    # cxenstored's -w WHAT=SECONDS, where watch-event is the one WHAT.
    what, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected WHAT=SECONDS, not {text!r}")
    if what != "watch-event":
        raise argparse.ArgumentTypeError(f"unknown timeout {what!r} (only watch-event)")
    try:
        seconds = float(value) or None  # 0: never, as in cxenstored
        check_limits(MAX_QUEUED, seconds)  # the rest is SimHost's rule
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"watch-event must be a number of seconds, 0 for never, not {value!r}") from None
    return what, seconds


def _max_queued(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    try:
        check_limits(size, WATCH_EVENT_TIMEOUT)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_QUEUED} bytes, not {size}") from None
    return size


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xenback-sim`` console script; returns the exit
    status (0 after SIGTERM, SIGINT or SIGHUP, 1 if the host cannot start,
    cannot create a ``--domain`` or cannot write to stdout, 2 for a
    ``--domain`` the host refuses, as dom0's name).  A bad option, and
    ``--help``, end it through argparse's SystemExit (2, and 0)."""
    parser = argparse.ArgumentParser(
        prog="xenback-sim",
        description="Run a simulated Xen host (XenStore, grants, event channels)."
    )
    parser.add_argument(
        "--run-dir", required=True, type=run_dir_argument, help="directory for the sockets"
    )
    parser.add_argument(
        "--domain", action="append", default=[], type=_domain_name, metavar="NAME",
        help="create a guest domain called NAME (repeat for more guests)"
    )
    parser.add_argument(
        "-w", "--timeout", action="append", default=[], type=_timeout,
        metavar="watch-event=SECONDS",
        help=f"drop a watch event for a guest left unsent this long (default "
             f"{WATCH_EVENT_TIMEOUT:g}; 0: never), as cxenstored's option"
    )
    parser.add_argument(
        "--max-queued", type=_max_queued, default=MAX_QUEUED, metavar="BYTES",
        help=f"drop watch events for a guest once this much waits for it "
             f"(default {MAX_QUEUED}, at least {MIN_QUEUED})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)
    twice = sorted({name for name in args.domain if args.domain.count(name) > 1})
    if twice:
        parser.error(f"argument --domain: {', '.join(map(repr, twice))} given more than once")
    unusable = stdio_problem(sys.stdout, writing=True)
    if unusable is not None:
        # Said before the host starts: closed, the ready lines would be lost
        # (as when the reader is gone) and the host's sockets would take
        # descriptor 1; open only for reading, they would fail once it ran.
        print(f"xenback-sim: cannot write to stdout: {unusable}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="xenback-sim: %(levelname)s %(name)s: %(message)s",
    )
    # SIGHUP stops it too, as it stops pvcalls-backend serve, unless it
    # is ignored: that is what nohup asked for.  (Linux queues a blocked
    # signal even while it is ignored, so sigwait would see it.)
    stop_signals = set(_STOP_SIGNALS)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stop_signals.add(signal.SIGHUP)
    # Block the stop signals before any thread starts (threads inherit the
    # mask), so that only sigwait below ever sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        host = SimHost(args.run_dir, max_queued=args.max_queued,
                       watch_event_timeout=dict(args.timeout).get("watch-event",
                                                                  WATCH_EVENT_TIMEOUT))
        host.start()
    except (OSError, RuntimeError) as e:
        print(f"xenback-sim: cannot start in {args.run_dir}: {e}", file=sys.stderr)
        return 1
    try:
        lines = [f"XENSTORED_PATH={host.xenstore_path}"]
        for name in args.domain:
            try:
                domain = host.create_domain(name)
            except OSError as e:  # no domid left, a socket path too long...
                print(f"xenback-sim: cannot create domain {name!r}: {e.strerror or e}",
                      file=sys.stderr)
                return 1
            lines.append(f"DOMAIN {domain.name} {domain.domid}")
        try:
            print("\n".join(lines), flush=True)
        except OSError as e:
            # Whoever was to read the ready lines is gone (EPIPE): nobody
            # will use this host.  Nor can Python flush stdout at exit.
            stdio_to_devnull(sys.stdout)
            print(f"xenback-sim: cannot write to stdout: {e.strerror or e}", file=sys.stderr)
            return 1
        sig = signal.sigwait(stop_signals)
        logger.info("%s: shutting down", signal.Signals(sig).name)
    except ValueError as e:
        print(f"xenback-sim: {e}", file=sys.stderr)
        return 2
    finally:
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
