"""Installs a SIGUSR1 handler from the script, signals itself and waits for the handler to run."""

import os
import signal
import threading

handled = threading.Event()


def on_usr1(signum, frame):
    print(f"handler ran for signal {signum}", flush=True)
    handled.set()


previous = signal.signal(signal.SIGUSR1, on_usr1)
print(f"previous handler is SIG_DFL: {previous == signal.SIG_DFL}", flush=True)
print(f"getsignal returns the handler: {signal.getsignal(signal.SIGUSR1) is on_usr1}", flush=True)
os.kill(os.getpid(), signal.SIGUSR1)
if handled.wait(60):
    print("after handler", flush=True)
else:
    print("handler never ran", flush=True)
    raise SystemExit(4)
