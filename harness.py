"""
The run harness: what keeps a run safe and honest, apart from the training itself (training.py).
A stage script enters it at its edges: claim_out_dir() before loading a model, save_checkpoint() /
write_json() at a step's end, run_cli() around main(). Nothing here runs inside a training step.

    claim_out_dir()       before training: the output folder is writable, locked, and no run is replaced unasked
    check_resume()        --resume refuses settings that contradict the checkpoint's run
    atomic_write()        every file the project writes: temp file + os.replace; a full disk says so
    save_checkpoint()     one atomic torch.save, loadable with weights_only=True; a Ctrl-C meanwhile is held
    provenance()          what produced a results file: commit, command, libraries, machine, time
    hub_reason()          a failed Hugging Face hub call in a few words
    run_cli()             the one-line `<script>: error: ...` for bad input (and Ctrl-C), no traceback
    positive_int, ...     argparse types: a bad number is refused when the command line is read
"""
import argparse
import errno
import fcntl
import functools
import glob
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch


# ----------------------------------------------------------------------------- files and checkpoints

class NonFiniteLossError(RuntimeError):
    """Raised by training.check_finite: the loss became NaN or inf."""


class SaveError(OSError):
    """A file could not be written (full disk, no permission); the previous version is intact."""


def atomic_write(path, write):
    """write(tmp_path) fills a temp file in the same folder, then os.replace puts it at `path`: a
    crash mid-write never leaves a truncated file behind (the previous one stays intact), and a
    failed write (a full disk) says so in one line."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        full = getattr(e, "errno", None) == errno.ENOSPC or "enforce fail" in str(e) or "write failed" in str(e)
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
        why = f"no space left on {folder}" if full else f"cannot write {path} ({type(e).__name__}: {e})"
        raise SaveError(f"{why}: {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def clean_stale_tmp(folder):
    """Remove the temp files of writes that a killed process left behind (.<name>.tmp<pid>)."""
    for f in glob.glob(os.path.join(folder, ".*.tmp*")):
        pid = f.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(f)


def _alive(pid):
    try:
        os.kill(pid, 0)                      # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:                  # it exists, owned by someone else
        pass
    return True


@contextmanager
def claim_out_dir(out_dir, resume, overwrite, outputs=("ckpt.pt",)):
    """with claim_out_dir(...): the run. Before any training: the folder is writable, no other run
    writes into it (an flock on <out_dir>/.lock, held until the with-block ends or the process dies,
    however it dies), and no finished or interrupted run in it is replaced unless asked
    (--resume continues it, --overwrite replaces it)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SaveError(f"cannot write to --out_dir {out_dir} ({e.strerror}): pick a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode(errors="replace").strip() or "another process"
            raise ValueError(f"--out_dir {out_dir} is in use by a running job ({holder}): wait for it, or pick "
                             "another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}"[:500].encode(), 0)
        clean_stale_tmp(out_dir)
        found = [f for f in outputs if os.path.exists(os.path.join(out_dir, f))]
        if found and not (resume or overwrite):
            raise ValueError(f"--out_dir {out_dir} already holds {', '.join(found)} of an earlier run: continue "
                             "it with --resume, start over with --overwrite, or pick another --out_dir")
        yield
    finally:
        os.close(fd)                             # closing the file releases the lock


def read_jsonl(path):
    """[(line number, object)] of a JSON-lines file; a line that is not a JSON object is an error
    naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in ((n, line) for n, line in enumerate(f, 1) if line.strip()):
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(rows[-1][1], dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object")
    return rows


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def strict_json(obj):
    """obj with every NaN/inf float replaced by None: strict JSON has no NaN (an undefined value is null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":")[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


@functools.lru_cache(maxsize=1)
def _source_and_machine():
    """The parts of provenance() that do not change while a process runs (read once)."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True).stdout.strip()
    try:
        commit, dirty = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty, "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu": cpu_name(),
            "host": socket.gethostname()}


def provenance(started=None):
    """Where a results file comes from: the git commit (and whether the tree had uncommitted
    changes), the command line, library versions, the machine, and when and how long it ran."""
    now = time.time()
    return {**_source_and_machine(), "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started or now)),
            "wall_s": round(now - started, 1) if started else None}


def write_json(path, obj):
    """Strict JSON (NaN/inf written as null), written atomically."""
    write_text(path, json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")


def save_checkpoint(path, ckpt):
    """One checkpoint dict (model, optimizer, step, config, args, rng, ...), written atomically.
    Only tensors and plain Python values, so that it loads with torch.load(weights_only=True).
    A Ctrl-C meanwhile is held until the file and LAST_SAVED agree (main thread, POSIX)."""
    hold = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    mask = hold and signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
        LAST_SAVED[:] = [path, ckpt.get("step")]
    finally:   # the held Ctrl-C (if any) is raised here, after the update
        hold and signal.pthread_sigmask(signal.SIG_SETMASK, mask)


LAST_SAVED = []   # [path, step] of this process's last checkpoint, for the Ctrl-C line


def check_resume(args, saved, keys, grow=()):
    """--resume continues a run as it was started: each setting in `keys` must equal the one the
    checkpoint's run used (saved: its args); those in `grow` (the length of the run) may only grow."""
    for k in keys:
        if k in saved and getattr(args, k, None) != saved[k]:
            if k in grow and saved[k] is not None and getattr(args, k) is not None and getattr(args, k) >= saved[k]:
                continue
            more = " or more" if k in grow else ""
            raise ValueError(f"--resume: --{k} is {getattr(args, k, None)!r} but the run in this --out_dir used "
                             f"{saved[k]!r}: resume with --{k} {saved[k]!r}{more}, or start a new run in another --out_dir")


# ----------------------------------------------------------------------------- command line

def hub_reason(e):
    """A short reason for a failed hub call, without the client's URL-laden retry messages."""
    name = type(e).__name__
    if any(k in name for k in ("Offline", "Connection", "LocalEntryNotFound", "Timeout", "MaxRetry")) \
            or "offline" in str(e).lower() or "resolve" in str(e).lower():
        return "no connection to the hub"
    if "NotFound" in name or "404" in str(e):
        return "not found on the hub"
    return name


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written and every option's default."""


def _number(kind, ok, what):
    def parse(s):
        try:
            v = kind(float(s)) if kind is int and "e" in s.lower() else kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    return parse


# argparse types: a bad number is refused when the command line is read, before any model loads
positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonneg_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "0 or more")


def run_cli(main, errors=(FileNotFoundError, ValueError, ConnectionError, NonFiniteLossError, SaveError)):
    """Bad input gets one line `<script>: error: ...` that says what is wrong and how to fix it;
    Ctrl-C one line that says where the last checkpoint is."""
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(f"{script}: interrupted" + (f"; the last checkpoint is {LAST_SAVED[0]} (step {LAST_SAVED[1]}): "
                         "continue with --resume" if LAST_SAVED else "; no checkpoint was written")) from None
    except errors as e:
        raise SystemExit(f"{script}: error: {e}") from None
