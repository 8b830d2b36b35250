"""Uses what it is told to: ``busy.py MEGABYTES OUTFILE``.

Holds MEGABYTES of touched memory, writes "ready" to OUTFILE, then spins on the
CPU for ever.
"""

import os
import sys

held = bytearray(int(sys.argv[1]) << 20)
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, b"ready\n")
n = 0
while True:
    n += 1
