"""A jaxlm command with a fault injected (not a test module itself).

usage: python fault_worker.py STEP SIGNAL JAXLM_ARGS...

Runs the jaxlm command line in this process and, through the loop's test hook
(`jaxlm.train.loop.step_hooks`), sends this process SIGNAL (KILL, TERM, ...) once step STEP is
logged: a crash or a preemption at a known point, as a cluster would cause it.
"""
import os
import signal
import sys


def main() -> int:
    step, name, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    from jaxlm import cli
    from jaxlm.train import loop

    def fault(done_step: int) -> None:
        if done_step == step:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))

    loop.step_hooks.append(fault)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
