"""4 concurrent 60-word streamed completions x 3 rounds against a router or vLLM server;
prints each request's TTFT and end-to-end time. Usage: python probe.py http://HOST:PORT"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

BASE = sys.argv[1]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "distributed",
    "systems",
    "tolerate",
    "failures",
]


def one(i: int) -> tuple[int, float, float]:
    prompt = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(60))
    body = {"model": "default", "prompt": prompt, "max_tokens": 32, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    start = time.perf_counter()
    first = 0.0
    headers = {"x-request-id": f"probe-{i}"}
    url = BASE + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and not first:
                first = time.perf_counter() - start
    return i, first, time.perf_counter() - start


with ThreadPoolExecutor(4) as pool:
    for rnd in range(3):
        for i, ttft, e2e in pool.map(one, range(rnd * 4, rnd * 4 + 4)):
            print(f"probe-{i} ttft {ttft:.3f} e2e {e2e:.3f}", flush=True)
