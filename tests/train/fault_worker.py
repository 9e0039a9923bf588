"""A jaxlm command with a fault injected (not a test module itself).

usage: python fault_worker.py STEP SIGNAL [DELAY_S] JAXLM_ARGS...

Runs the jaxlm command line in this process and, through the loop's test hook
(`jaxlm.train.loop.step_hooks`), sends this process SIGNAL (KILL, TERM, ...) once step STEP is
logged, or DELAY_S seconds after that from another thread (so that it lands in what the loop
does next, such as a checkpoint save): a crash or a preemption at a known point, as a cluster
would cause it.
"""
import os
import signal
import sys
import threading


def main() -> int:
    step, name, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    delay = 0.0
    try:
        delay, argv = float(argv[0]), argv[1:]
    except ValueError:
        pass
    from jaxlm import cli
    from jaxlm.train import loop

    def send() -> None:
        os.kill(os.getpid(), getattr(signal, "SIG" + name))

    def fault(done_step: int) -> None:
        if done_step == step:
            threading.Timer(delay, send).start() if delay else send()

    loop.step_hooks.append(fault)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
