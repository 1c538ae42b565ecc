"""Fork server for the kill tests of tests/test_checkpoint_faults.py.

Importing torch and Lightning takes seconds; forking a warm process takes milliseconds. The parent
process never runs a torch operation (so no thread pool exists when it forks). Protocol, one line each
on stdin, answers on stdout:

    run <out_dir> <sync|async> <top_k|last|both> <write_sleep_ms>   -> "<pid>"  (a child trains and saves every step)
    reap <pid>                                                 -> "exit <code>" | "signal <number>"

A child trains a tiny model for many steps with a checkpoint after every step; each tensor write
sleeps a little so that saves take most of the time and a kill is likely to land inside one.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import lightning_megatrain  # noqa: E402
from lightning_megatrain import checkpoint as ck  # noqa: E402
from models import BlockLM, data, trainer  # noqa: E402


def _child(out: str, mode: str, keep: str, sleep_ms: float) -> int:
    real_write = ck._ShardWriter.write

    def slow_write(self: object, t: object) -> None:
        time.sleep(sleep_ms / 1000)
        real_write(self, t)  # type: ignore[arg-type]

    ck._ShardWriter.write = slow_write  # type: ignore[method-assign]
    L.seed_everything(0)
    if keep == "top_k":
        cb = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=1, filename="{step}")
    elif keep == "last":
        cb = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=0, save_last=True)
    else:  # two saves per step: the second waits for the first with no optimizer step pending
        cb = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=1, save_last=True, filename="{step}")
    strategy = lightning_megatrain.MegaTrainStrategy(async_checkpoint=mode == "async")
    t = trainer(strategy, max_steps=100_000, enable_checkpointing=True, callbacks=[cb])
    try:
        t.fit(BlockLM(d=16, n=3, dropout=0.0), data(n=64))
    except SystemExit as err:  # Lightning's answer to Ctrl-C, after its graceful shutdown
        return int(err.code or 0)
    return 0


def main() -> None:
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            pid = os.fork()
            if pid == 0:
                faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung child can be asked where it is
                # Ctrl-C must raise KeyboardInterrupt even if this process tree was started with SIGINT
                # ignored (a shell's background job: Python then installs no handler of its own)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = 1
                try:
                    code = _child(args[0], args[1], args[2], float(args[3]))
                finally:
                    os._exit(code)
            print(pid, flush=True)
        elif cmd == "reap":
            pid, deadline = int(args[0]), time.monotonic() + 120
            while True:  # a child that does not end is killed: the test then fails instead of hanging
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    print("timeout", flush=True)
                    status = None
                    break
                time.sleep(0.01)
            if status is None:
                continue
            if os.WIFSIGNALED(status):
                print(f"signal {os.WTERMSIG(status)}", flush=True)
            else:
                print(f"exit {os.WEXITSTATUS(status)}", flush=True)


if __name__ == "__main__":
    main()
