"""An expected error inside a multi-process launch (`accelerate launch`, `torchrun`): said once, by the process that
met it. Processes that stop only because a peer died (gloo's "Connection closed by peer", NCCL's aborted
communicator) say so in a plain line, not as a second error; processes of one machine meeting the same error print it
once; and the launcher's failure summary names the error as its root cause (torchrun's error file) instead of a
link to its documentation."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time

PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
                 "remote process exited", "NCCL communicator was aborted", "Broken pipe")
SAID_FOR = 600  # seconds during which the same line from the same launcher is not said again


def in_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def say_error(line: str, message: str) -> None:
    """Print `line` (an `error:` line of `message`) on stderr, as fits this process's place in a launch."""
    if not in_launch():
        print(line, file=sys.stderr)
        return
    if any(words in message for words in PEER_FAILURES):
        rank = os.environ.get("RANK", "?")
        print(f"\nprocess {rank} stopped: another process of the launch failed (its error is above, or in its "
              "machine's log)", file=sys.stderr)
        return
    record_for_launcher(message)
    if first_to_say(line):  # on a line of its own: another process's progress bar may be mid-line
        print(f"\n{line}", file=sys.stderr)


def first_to_say(line: str) -> bool:
    """Whether no other process of this machine's launcher (our parent) said `line` in the last `SAID_FOR` s."""
    digest = hashlib.sha256(f"{os.getppid()}\0{line}".encode()).hexdigest()[:24]
    path = os.path.join(tempfile.gettempdir(), f"convnextv2-hf-said-{digest}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        try:
            if time.time() - os.path.getmtime(path) > SAID_FOR:  # a stale record of an earlier launcher's
                os.utime(path)
                return True
        except OSError:
            return True
        return False
    except OSError:  # no writable temporary folder: rather twice than never
        return True


def record_for_launcher(message: str) -> None:
    """Write `message` into torchrun's error file for this process, which its failure summary shows."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # the summary then shows torchrun's own text
