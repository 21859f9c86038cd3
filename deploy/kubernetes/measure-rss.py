#!/usr/bin/env python3
"""The memory figures of deployment.yaml: the resident memory of one release `spray serve`
under a short mixed load, read from /proc (VmRSS now, VmHWM the peak).

    python3 deploy/kubernetes/measure-rss.py PID http://127.0.0.1:PORT [SECONDS] [CONNECTIONS]

PID is the server's process id. Standard library only: CONNECTIONS keep-alive HTTP/1.1
connections, each spraying (1 to 100 shares) and receiving from the sprays of the others,
with lookups, until SECONDS have passed; then prints requests, statuses and memory.
"""
import asyncio
import json
import random
import sys
import time
from collections import Counter
from urllib.parse import urlparse


def memory_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


async def request(reader, writer, method, path, user, body=None):
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: spray\r\nX-USER-ID: {user}\r\nX-ROOM-ID: load-room\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    answer = await reader.readexactly(length)
    return int(status_line.split()[1]), answer


async def client(host, port, deadline, user, tokens, statuses):
    reader, writer = await asyncio.open_connection(host, port)
    while time.monotonic() < deadline:
        kind = random.random()
        if kind < 0.2 or not tokens:
            body = {"amount": random.randint(100, 100_000), "recipient_count": random.randint(1, 100),
                    "mode": random.choice(["even", "random"])}
            status, answer = await request(reader, writer, "POST", "/api/v1/spray", user, body)
            if status == 201:
                tokens.append(json.loads(answer)["token"])
                del tokens[:-500]
        elif kind < 0.9:
            receiver = random.randint(1_000, 10_000_000)
            status, _ = await request(reader, writer, "POST", "/api/v1/receive", receiver,
                                      {"token": random.choice(tokens)})
        else:
            status, _ = await request(reader, writer, "GET", f"/api/v1/spray/{random.choice(tokens)}", user)
        statuses[status] += 1
    writer.close()


async def main():
    pid, base = int(sys.argv[1]), urlparse(sys.argv[2])
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 30
    connections = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    print("before", memory_kib(pid))
    deadline = time.monotonic() + seconds
    tokens, statuses = [], Counter()
    peak = 0

    async def sample():
        nonlocal peak
        while time.monotonic() < deadline:
            peak = max(peak, memory_kib(pid)["VmRSS"])
            await asyncio.sleep(0.5)

    await asyncio.gather(sample(), *(client(base.hostname, base.port, deadline, i + 1, tokens, statuses)
                                     for i in range(connections)))
    total = sum(statuses.values())
    print(f"{total} requests in {seconds:.0f} s ({total / seconds:.0f}/s), statuses {dict(statuses)}")
    print("after", memory_kib(pid), f"peak VmRSS sampled {peak} KiB")


asyncio.run(main())
