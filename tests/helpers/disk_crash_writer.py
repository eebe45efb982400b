"""Child process for the crash test: random allocating writes, discards and flushes on a
qcow2 image until it is killed with SIGKILL. Prints 'ready' once it has started."""

import random
import sys

import pyhv.disk


def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    with pyhv.disk.open(path, "qcow2") as disk:
        size = disk.size
        print("ready", flush=True)
        i = 0
        while True:
            off = rng.randrange(0, size - 70000)
            n = rng.randrange(1, 70000)
            r = rng.random()
            if r < 0.1:
                disk.discard(off, n * 4)
            elif r < 0.15:
                disk.write_zeroes(off, n)
            else:
                disk.write(off, bytes([i & 0xFF]) * n)
            if i % 7 == 0:
                disk.flush()
            i += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
