"""Takes memory until something stops it: ``hog.py OUTFILE``.

Touches 16 MiB more every step and appends how much it holds to OUTFILE.
"""

import os
import sys

held = []
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
while True:
    held.append(bytearray(16 << 20))  # zero-filled: every page touched
    os.write(fd, f"{len(held) * 16}\n".encode())
