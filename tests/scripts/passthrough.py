"""Writes to stdout/stderr in every way a script does (print, sys.*.write, os.write on fds 1 and 2)."""

import os
import sys

for i in range(150):
    print(f"bulk {i}", flush=True)
print("line one", flush=True)
print("unicode: h\u00e9llo \u2713 \u65e5\u672c", flush=True)
sys.stdout.write("progress 10%\rprogress 100%\n")
sys.stdout.flush()
print("to stderr", file=sys.stderr, flush=True)
os.write(1, b"raw fd1 line\n")
os.write(2, b"raw fd2 line\n")
sys.stdout.write("no newline at end")
sys.stdout.flush()
