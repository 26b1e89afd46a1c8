"""Why sparse sends cost more than back-to-back ones: a raw zmq PUSH send versus a raw AF_UNIX datagram
send of the same 12-byte event, each to a receiver in another process, one send every --gap-us.

A zmq send that finds its pipe idle must wake zmq's I/O thread (and that thread the receiver's); a
datagram send is one system call straight into the receiver's socket buffer. This isolates the transport
from envpipe's own code (see docs/performance.md, "Agent").

    python benchmarks/agent/bench_transport.py [--sends 5000] [--gap-us 200]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import zmq
from common import machine, summary_us

_RECEIVER = """
import socket, sys, zmq
kind, address = sys.argv[1], sys.argv[2]
if kind == "zmq":
    sock = zmq.Context().socket(zmq.PULL); sock.bind(address); print("ready", flush=True)
    while sock.recv() != b"stop": pass
else:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); sock.bind(address); print("ready", flush=True)
    while sock.recv(64) != b"stop": pass
"""


def _measure(send, sends: int, gap_us: float) -> tuple[list[int], int]:
    perf = time.perf_counter_ns
    frame = b"\xe7\x01\x00" + b"\x00" * 6 + b"F12"
    timings, dropped = [], 0
    for _ in range(sends):
        start_ns = perf()
        try:
            send(frame)
        except (zmq.Again, BlockingIOError):  # a datagram queue holds only net.unix.max_dgram_qlen (10)
            dropped += 1
        timings.append(perf() - start_ns)
        time.sleep(gap_us / 1e6)
    return timings, dropped


def _run(kind: str, address: str, sends: int, gap_us: float) -> dict[str, float]:
    sock: zmq.Socket | socket.socket
    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, kind, address], stdout=subprocess.PIPE, text=True
    )
    receiver.stdout.readline()
    if kind == "zmq":
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(address)
        time.sleep(0.2)
        timings, dropped = _measure(lambda f: sock.send(f, zmq.NOBLOCK), sends, gap_us)
        sock.send(b"stop")
        sock.close()
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.connect(address)
        sock.setblocking(False)
        timings, dropped = _measure(sock.send, sends, gap_us)
        sock.send(b"stop")
        sock.close()
    receiver.wait(10)
    receiver.stdout.close()
    return {**summary_us(timings), "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=5000)
    parser.add_argument("--gap-us", type=float, default=200.0)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="ep-transport-")
    results = {
        "zmq_push_ipc": _run("zmq", f"ipc://{directory}/push.sock", args.sends, args.gap_us),
        "unix_datagram": _run("dgram", os.path.join(directory, "dgram.sock"), args.sends, args.gap_us),
    }
    print(
        json.dumps(
            {"benchmark": f"raw sparse send, one per {args.gap_us:g} us", **results, "machine": machine()},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
